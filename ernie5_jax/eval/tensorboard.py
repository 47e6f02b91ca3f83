"""The eval job's report as TensorBoard summaries (clu metric_writers), beside its JSON/PNG files.

  write_report(writer, step, rows, analysis, plot_paths)

At the checkpoint's training step, so that `tensorboard --logdir <train workdir>` shows them
against the training curves (the eval job's --workdir inside the training workdir is a run
of its own, e.g. "eval"):
  scalars  eval/loss_all, eval/loss/<modality>, eval/accuracy/<modality>   the full model
           eval/family/d<depth>_e<experts>_k<top_k>/{loss_all, loss/<m>, accuracy/<m>,
               decode_tokens_per_sec}                                      every sub-model
           eval/routing/entropy/<modality>, eval/routing/top_expert_iou/<a>-<b>
                                                                           means over layers
  text     eval/family_table      the printed family table (a markdown code block)
  images   eval/routing_plots/<name>   the routing PNGs (eval/routing_plots.py), when written
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from clu import metric_writers


def submodel_tag(submodel: dict[str, int]) -> str:
  """'d2_e4_k1' for {"depth": 2, "experts": 4, "top_k": 1} (a TensorBoard-friendly name)."""
  return f"d{submodel['depth']}_e{submodel['experts']}_k{submodel['top_k']}"


def family_scalars(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Scalars of the family report rows (job.py): the full model's, then each sub-model's."""
  out = {}
  for row in rows:
    prefixes = [f"eval/family/{submodel_tag(row['submodel'])}"]
    if row["full"]:
      prefixes.append("eval")
    for prefix in prefixes:
      out[f"{prefix}/loss_all"] = row["loss_all"]
      out.update({f"{prefix}/loss/{m}": v for m, v in row["loss"].items()})
      out.update({f"{prefix}/accuracy/{m}": v for m, v in row["accuracy"].items()})
    if row["decode_tokens_per_sec"] is not None:
      out[f"{prefixes[0]}/decode_tokens_per_sec"] = row["decode_tokens_per_sec"]
  return out


def routing_scalars(analysis: dict[str, Any] | None) -> dict[str, float]:
  """Mean-over-layers routing entropy per modality and top-expert IoU per modality pair."""
  if analysis is None:
    return {}
  out = {f"eval/routing/entropy/{m}": v["mean"] for m, v in analysis["entropy"].items()}
  out.update({f"eval/routing/top_expert_iou/{pair}": v["mean"]
              for pair, v in analysis["top_expert_iou"].items()})
  return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def read_png(path: str) -> np.ndarray:
  """A PNG file as uint8 [height, width, 3] (alpha dropped)."""
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  image = matplotlib.image.imread(path)  # [H, W, 3 or 4] float in [0, 1] for PNGs
  return np.round(np.asarray(image)[..., :3] * 255).astype(np.uint8)


def write_report(writer: metric_writers.MetricWriter, step: int,
                 rows: Sequence[dict[str, Any]], analysis: dict[str, Any] | None,
                 plot_paths: Sequence[str] = (), table: str = "") -> None:
  """Writes the family report and routing analysis of checkpoint `step` (see module doc)."""
  writer.write_scalars(step, {**family_scalars(rows), **routing_scalars(analysis)})
  if table:  # Indented: TensorBoard renders text as markdown; a code block keeps the columns.
    writer.write_texts(step, {"eval/family_table": "\n".join("    " + line
                                                             for line in table.splitlines())})
  if plot_paths:
    writer.write_images(step, {
        f"eval/routing_plots/{os.path.splitext(os.path.basename(p))[0].removeprefix('routing_')}":
        read_png(p)[None] for p in plot_paths})  # [1, H, W, 3]
  writer.flush()
