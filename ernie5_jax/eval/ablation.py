"""Elastic-vs-static comparison of two eval-job family reports (the issue #5 ablation).

`compare` pairs the family rows of an elastic run and a static (non-elastic) run trained
with the same budget; `markdown` renders the table of docs/elastic.md. Used by
benchmarks/elastic_ablation.py and notebooks/elastic_family.ipynb.
"""

from __future__ import annotations

import json
import os


def load_report(path: str) -> dict:
  """Reads an eval job's family_report.json (path: the file or its directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "family_report.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: expected the output dir of "
                     "`python -m ernie5_jax.main --mode=eval --checkpoint=... --workdir=DIR`")
  with open(path) as f:
    return json.load(f)


def key(row: dict) -> tuple[int, int, int]:
  """A family row's (depth, experts, top_k)."""
  s = row["submodel"]
  return s["depth"], s["experts"], s["top_k"]


def mean_loss(row: dict) -> float:
  """Token-weighted mean loss over the row's modalities (plain mean without token counts)."""
  losses, tokens = row["loss"], row.get("tokens", {})
  if tokens and all(m in tokens for m in losses):
    total = sum(tokens[m] for m in losses)
    return sum(losses[m] * tokens[m] for m in losses) / total
  return sum(losses.values()) / len(losses)


def compare(elastic: dict, static: dict) -> dict:
  """Pairs the two reports' families row by row; returns the table rows and the targets."""
  static_rows = {key(r): r for r in static["submodels"]}
  rows = []
  for r in elastic["submodels"]:
    s = static_rows.get(key(r))
    if s is None:
      raise ValueError(f"sub-model {key(r)} is in the elastic report but not in the static "
                       "one: evaluate both with the same config.elastic choices")
    rows.append({"submodel": key(r), "full": r["full"], "total_params": r["total_params"],
                 "active_params_per_token": r["active_params_per_token"],
                 "elastic_loss": r["loss"], "static_loss": s["loss"],
                 "elastic_mean": mean_loss(r), "static_mean": mean_loss(s),
                 "decode_tokens_per_sec": r["decode_tokens_per_sec"]})
  full = next(r for r in rows if r["full"])
  cost = (full["elastic_mean"] - full["static_mean"]) / full["static_mean"]
  subs = [r for r in rows if not r["full"]]
  return {"rows": rows, "full_model_loss_cost": cost,
          "submodels_beating_truncation": sum(r["elastic_mean"] < r["static_mean"]
                                              for r in subs),
          "submodels": len(subs)}


def markdown(result: dict) -> str:
  """The ablation table of docs/elastic.md."""
  modalities = [m for m in ("text", "image", "video", "audio")
                if any(m in r["elastic_loss"] for r in result["rows"])]
  head = ("| sub-model (depth, experts, top-k) | total params | active/token | "
          + " | ".join(f"{m} loss E / S" for m in modalities)
          + " | mean E / S | decode tok/s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["rows"]:
    name = "{},{},{}".format(*r["submodel"]) + (" (full)" if r["full"] else "")
    cells = [f"{r['elastic_loss'][m]:.3f} / {r['static_loss'][m]:.3f}"
             if m in r["elastic_loss"] else "-" for m in modalities]
    decode = r["decode_tokens_per_sec"]
    lines.append(f"| {name} | {r['total_params']:,} | {r['active_params_per_token']:,} | "
                 + " | ".join(cells)
                 + f" | {r['elastic_mean']:.3f} / {r['static_mean']:.3f} | "
                 + (f"{decode:.0f}" if decode else "n/a") + " |")
  return "\n".join(lines)
