"""PNG plots of a routing analysis (eval/routing.py routing_analysis output), matplotlib Agg.

  files = plot_all(analysis, out_dir)
    routing_frequency.png   expert activation frequency, one heatmap [layer x expert] per modality
    routing_iou.png         top-expert IoU per layer for each modality pair, and the matrix of
                            their means over layers
    routing_entropy.png     normalised routing entropy per layer for each modality
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only: no display on eval machines.
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top


def _array(values) -> np.ndarray:
  """JSON lists with None (NaN) -> float array."""
  return np.array(values, dtype=np.float64) if values is not None else np.array([])


def _present(analysis: dict[str, Any]) -> list[str]:
  return [m for m in analysis["modalities"] if analysis["tokens"].get(m, 0) > 0]


def _integer_ticks(ax, n: int, axis: str) -> None:
  """Ticks at 0..n-1 (every one up to 16, else matplotlib's integer locator)."""
  ticks = np.arange(n) if n <= 16 else None
  if ticks is not None:
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
  else:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(
        matplotlib.ticker.MaxNLocator(integer=True))


def plot_frequency(analysis: dict[str, Any], path: str) -> str:
  """Heatmaps of activation frequency [layer, expert], one panel per present modality."""
  mods = _present(analysis)
  fig, axes = plt.subplots(1, max(len(mods), 1), figsize=(3.2 * max(len(mods), 1), 3.0),
                           squeeze=False, constrained_layout=True)
  vmax = max([np.nanmax(_array(analysis["frequency"][m])) for m in mods] + [1e-9])
  image = None
  for ax, m in zip(axes[0], mods):
    image = ax.imshow(_array(analysis["frequency"][m]), aspect="auto", cmap="viridis",
                      vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(f"{m} ({analysis['tokens'][m]} tokens)", fontsize=9)
    ax.set_xlabel("expert")
    _integer_ticks(ax, analysis["num_experts"], "x")
    _integer_ticks(ax, analysis["num_layers"], "y")
  axes[0][0].set_ylabel("MoE layer")
  if image is not None:
    fig.colorbar(image, ax=axes[0].tolist(), label="frequency")
  fig.suptitle("expert activation frequency (share of each modality's routed slots)",
               fontsize=10)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_iou(analysis: dict[str, Any], path: str) -> str:
  """Left: top-expert IoU per layer, one line per modality pair; right: mean IoU matrix."""
  fig, (ax, mat) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
  for pair, v in analysis["top_expert_iou"].items():
    per_layer = _array(v["per_layer"])
    ax.plot(np.arange(len(per_layer)), per_layer, marker="o", label=pair)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("MoE layer")
  ax.set_ylabel("IoU")
  _integer_ticks(ax, analysis["num_layers"], "x")
  ax.set_title(f"IoU of the top {analysis['top_fraction']:.0%} experts "
               f"({analysis['top_size']} of {analysis['num_experts']}) per layer", fontsize=9)
  if analysis["top_expert_iou"]:
    ax.legend(fontsize=7)
  mods = _present(analysis)
  means = np.eye(len(mods))
  for a, ma in enumerate(mods):
    for b, mb in enumerate(mods):
      v = analysis["top_expert_iou"].get(f"{ma}-{mb}") or analysis["top_expert_iou"].get(
          f"{mb}-{ma}")
      if v is not None:
        means[a, b] = np.nan if v["mean"] is None else v["mean"]
  mat.imshow(means, vmin=0.0, vmax=1.0, cmap="magma")
  for a in range(len(mods)):
    for b in range(len(mods)):
      mat.text(b, a, f"{means[a, b]:.2f}", ha="center", va="center", fontsize=8,
               color="black" if means[a, b] > 0.5 else "white")
  mat.set_xticks(np.arange(len(mods)), mods)
  mat.set_yticks(np.arange(len(mods)), mods)
  mat.set_title("mean over layers", fontsize=9)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_entropy(analysis: dict[str, Any], path: str) -> str:
  """Normalised routing entropy per layer, one line per present modality."""
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for m in _present(analysis):
    per_layer = _array(analysis["entropy"][m]["per_layer"])
    ax.plot(np.arange(len(per_layer)), per_layer, marker="o", label=m)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("MoE layer")
  ax.set_ylabel("H(p) / log E")
  _integer_ticks(ax, analysis["num_layers"], "x")
  ax.set_title("normalised routing entropy (mean over tokens)", fontsize=10)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_all(analysis: dict[str, Any], out_dir: str) -> list[str]:
  """Writes the three plots into out_dir; returns their file names."""
  names = {"routing_frequency.png": plot_frequency, "routing_iou.png": plot_iou,
           "routing_entropy.png": plot_entropy}
  for name, plot in names.items():
    plot(analysis, os.path.join(out_dir, name))
  return list(names)
