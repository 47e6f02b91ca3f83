"""M2CP vs supervised-only on data/shapes3d: seeds x label fractions -> JSON + markdown table.

  python benchmarks/m2cp_table.py                       # 3 seeds x {2, 5, 10}% x 2 methods
  python benchmarks/m2cp_table.py --fractions=0.02 --seeds=0   # a subset
  python benchmarks/m2cp_table.py --collect_only        # table of the runs already done

Each run is `python -m ernie5_jax.main --config=experiments/m2cp_shapes[_supervised].py:
frac=F,seed=S` in <workroot>/<method>_f<F>_s<S>; a finished run is not repeated (the
trainer says there is nothing to do), an interrupted one resumes. The table reports
mean ± std over seeds of the fused test accuracy and of the mean retrieval mAP (3
within-modality + 6 cross-modality), from each run's final eval_metrics.json entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = {"m2cp": "experiments/m2cp_shapes.py",
               "supervised": "experiments/m2cp_shapes_supervised.py"}

flags.DEFINE_list("fractions", ["0.02", "0.05", "0.1"], "Label fractions.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, batches and labelled split).")
flags.DEFINE_list("methods", list(EXPERIMENTS), "Subset of m2cp, supervised.")
flags.DEFINE_integer("steps", 0, "Override train.num_steps (0: the experiment's default).")
flags.DEFINE_string("workroot", "/tmp/m2cp_table", "Parent of the runs' workdirs.")
flags.DEFINE_string("out", os.path.join(REPO, "benchmarks/results/m2cp_table"),
                    "Output path without extension (.json and .md are written).")
flags.DEFINE_bool("collect_only", False, "Only tabulate runs already in --workroot.")
FLAGS = flags.FLAGS


def _workdir(method: str, frac: str, seed: str) -> str:
  return os.path.join(FLAGS.workroot, f"{method}_f{frac}_s{seed}")


def _final(workdir: str) -> dict | None:
  path = os.path.join(workdir, "eval_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  step = max(saved, key=int)
  return dict(saved[step], step=int(step))


def _run(method: str, frac: str, seed: str) -> float:
  arg = f"frac={frac},seed={seed}" + (f",steps={FLAGS.steps}" if FLAGS.steps else "")
  cmd = [sys.executable, "-m", "ernie5_jax.main", f"--config={EXPERIMENTS[method]}:{arg}",
         f"--workdir={_workdir(method, frac, seed)}"]
  print(" ".join(cmd), flush=True)
  start = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return time.perf_counter() - start


def _fmt(values: list[float]) -> str:
  if not values:
    return "—"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f} (n={len(values)})"


def main(argv):
  """Runs the missing runs of the grid, then writes the JSON and markdown table."""
  del argv
  timings = {}
  if not FLAGS.collect_only:
    for frac in FLAGS.fractions:
      for seed in FLAGS.seeds:
        for method in FLAGS.methods:
          timings[f"{method}_f{frac}_s{seed}"] = _run(method, frac, seed)
  runs = {}
  for frac in FLAGS.fractions:
    for seed in FLAGS.seeds:
      for method in FLAGS.methods:
        result = _final(_workdir(method, frac, seed))
        if result is not None:
          runs[f"{method}_f{frac}_s{seed}"] = result
  rows = ["| labels | method | fused accuracy (%) | mean retrieval mAP (%) | point / view / mesh "
          "accuracy (%) |", "|---|---|---|---|---|"]
  for frac in FLAGS.fractions:
    for method in FLAGS.methods:
      got = [runs[k] for k in (f"{method}_f{frac}_s{s}" for s in FLAGS.seeds) if k in runs]
      per_mod = " / ".join(f"{100 * np.mean([r[f'accuracy/{m}'] for r in got]):.1f}"
                           if got else "—" for m in ("point", "view", "mesh"))
      rows.append(f"| {100 * float(frac):g}% | {method} | "
                  f"{_fmt([r['accuracy/fused'] for r in got])} | "
                  f"{_fmt([r['map/mean'] for r in got])} | {per_mod} |")
  table = "\n".join(rows)
  print(table)
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump({"runs": runs, "wall_seconds": timings}, f, indent=1, sort_keys=True)
  with open(FLAGS.out + ".md", "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
