"""M2CP vs supervised-only on data/shapes3d: seeds x label fractions -> JSON + markdown table.

  python benchmarks/m2cp_table.py                       # 3 seeds x {2, 5, 10}% x 2 methods
  python benchmarks/m2cp_table.py --jobs=2              # the same, two runs at a time
  python benchmarks/m2cp_table.py --fractions=0.02 --seeds=0   # a subset
  python benchmarks/m2cp_table.py --collect_only        # table of the runs already done
  python benchmarks/m2cp_table.py --fractions=0.02 --methods=m2cp,supervised,m2cp_paper,\
      m2cp_drop_pseudo_ce,m2cp_drop_alignment,m2cp_drop_balance   # + published / ablations

Each run is `python -m ernie5_jax.main --config=experiments/m2cp_shapes[_supervised].py:
frac=F,seed=S` in <workroot>/<method>_f<F>_s<S>; a finished run (final eval at the
step count) is skipped, an interrupted one resumes from its last checkpoint.
A failed run does not stop the others; the JSON and table are rewritten after every run,
so a crash loses at most the runs in flight. Each run's wall time is kept in
<workdir>/wall_seconds.json (only for a run done in one invocation from scratch, with
--jobs and the load average). The table covers the default grid (plus any run asked for
outside it) and reports mean ± std (population std, over seeds) of the fused test
accuracy and of the mean retrieval mAP (3 within-modality + 6 cross-modality), from each
run's final eval_metrics.json entry, and the margin of M2CP over supervised per seed
(one seed gives both methods the same labelled split and init): mean ± std, smallest.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from ernie5_jax.m2cp import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# method -> experiment config (and its fixed args): this project's recipe, supervised-only,
# M2CP as published (experiments/m2cp_paper.py) and the recipe with one addition dropped.
EXPERIMENTS = {"m2cp": "experiments/m2cp_shapes.py",
               "supervised": "experiments/m2cp_shapes_supervised.py",
               "m2cp_paper": "experiments/m2cp_paper.py",
               "m2cp_drop_pseudo_ce": "experiments/m2cp_shapes.py:drop=pseudo_ce",
               "m2cp_drop_alignment": "experiments/m2cp_shapes.py:drop=alignment",
               "m2cp_drop_balance": "experiments/m2cp_shapes.py:drop=balance"}
DEFAULT_METHODS = ["m2cp", "supervised"]  # The default grid; the others by --methods.

flags.DEFINE_list("fractions", ["0.02", "0.05", "0.1"], "Label fractions.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, batches and labelled split).")
flags.DEFINE_list("methods", DEFAULT_METHODS, f"Methods, of {list(EXPERIMENTS)}.")
flags.DEFINE_integer("steps", 0, "Override train.num_steps (0: the experiment's default).")
flags.DEFINE_string("workroot", "/tmp/m2cp_table", "Parent of the runs' workdirs.")
flags.DEFINE_string("out", os.path.join(REPO, "benchmarks/results/m2cp_table"),
                    "Output path without extension (.json and .md are written).")
flags.DEFINE_bool("collect_only", False, "Only tabulate runs already in --workroot.")
flags.DEFINE_integer("jobs", 1, "Runs at a time (each is its own process).")
FLAGS = flags.FLAGS
DEFAULT_STEPS = config_lib.default_config().train.num_steps  # The experiments keep it.


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


def _wall_seconds(workdir: str) -> float | None:
  path = os.path.join(workdir, "wall_seconds.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["wall_seconds"]


def _has_checkpoint(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _run(method: str, frac: str, seed: str) -> None:
  """Runs (or resumes, or skips if finished) one run; records its wall time if it was new."""
  workdir = _workdir(method, frac, seed)
  path, _, fixed = EXPERIMENTS[method].partition(":")
  arg = ",".join(a for a in (fixed, f"frac={frac},seed={seed}",
                             f"steps={FLAGS.steps}" if FLAGS.steps else "") if a)
  cmd = [sys.executable, "-m", "ernie5_jax.main", f"--config={path}:{arg}",
         f"--workdir={workdir}"]
  final = _final(workdir)
  if final is not None and final["step"] >= (FLAGS.steps or DEFAULT_STEPS):
    return  # Finished: no need to start a process to be told so.
  fresh = final is None and not _has_checkpoint(workdir)
  print(" ".join(cmd), flush=True)
  started, start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  wall = time.perf_counter() - start
  print(f"  {os.path.basename(workdir)}: {wall:.0f} s", flush=True)
  if fresh:  # A resumed or skipped run's wall time would not be the run's.
    with open(os.path.join(workdir, "wall_seconds.json"), "w") as f:
      json.dump({"wall_seconds": wall, "started": started, "jobs": FLAGS.jobs,
                 "load_average": os.getloadavg()}, f)


def _fmt(values: list[float]) -> str:
  if not values:
    return "—"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f} (n={len(values)})"


def _table_grid() -> list[tuple[str, str, str]]:
  """The runs tabulated: the default grid plus any requested run outside it."""
  grid = []
  for fracs, seeds, methods in ((FLAGS["fractions"].default, FLAGS["seeds"].default,
                                 FLAGS["methods"].default),
                                (FLAGS.fractions, FLAGS.seeds, FLAGS.methods)):
    grid += [(m, f, s) for f in fracs for s in seeds for m in methods
             if (m, f, s) not in grid]
  return grid


def write_table() -> str:
  """Collects the finished runs in --workroot; writes --out .json / .md; returns the table."""
  grid = _table_grid()
  fractions = list(dict.fromkeys(f for _, f, _ in grid))
  methods = list(dict.fromkeys(m for m, _, _ in grid))
  runs, timings = {}, {}
  for method, frac, seed in grid:
    workdir, key = _workdir(method, frac, seed), f"{method}_f{frac}_s{seed}"
    result, wall = _final(workdir), _wall_seconds(workdir)
    if result is not None:
      runs[key] = result
    if wall is not None:
      timings[key] = wall
  rows = ["| labels | method | fused accuracy (%) | mean retrieval mAP (%) | point / view / mesh "
          "accuracy (%) |", "|---|---|---|---|---|"]
  summary = {}
  for frac in fractions:
    for method in methods:
      got = [r for k, r in runs.items() if k.startswith(f"{method}_f{frac}_s")]
      per_mod = " / ".join(f"{100 * np.mean([r[f'accuracy/{m}'] for r in got]):.1f}"
                           if got else "—" for m in ("point", "view", "mesh"))
      rows.append(f"| {100 * float(frac):g}% | {method} | "
                  f"{_fmt([r['accuracy/fused'] for r in got])} | "
                  f"{_fmt([r['map/mean'] for r in got])} | {per_mod} |")
      if got:
        summary[f"{method}_f{frac}"] = {
            "n": len(got), "steps": sorted({r["step"] for r in got}),
            **{f"{k}/{stat}": float(fn([r[k] for r in got]))
               for k in ("accuracy/fused", "map/mean") for stat, fn in (("mean", np.mean),
                                                                         ("std", np.std))}}
    # Margin: per-seed (same labelled split and init) differences, mean ± std and the worst.
    seeds = [k.rsplit("_s", 1)[1] for k in runs if k.startswith(f"m2cp_f{frac}_s")]
    pairs = [(runs[f"m2cp_f{frac}_s{s}"], runs[f"supervised_f{frac}_s{s}"]) for s in seeds
             if f"supervised_f{frac}_s{s}" in runs]
    if pairs:
      cells = []
      for key in ("accuracy/fused", "map/mean"):
        diff = [100 * (a[key] - b[key]) for a, b in pairs]
        cells.append(f"{np.mean(diff):+.1f} ± {np.std(diff):.1f} (min {min(diff):+.1f})")
        summary[f"margin_f{frac}"] = dict(summary.get(f"margin_f{frac}", {}), n=len(pairs),
                                          **{f"{key}/per_seed": [d / 100 for d in diff]})
      rows.append(f"| {100 * float(frac):g}% | margin, per seed (m2cp - supervised) | "
                  f"{cells[0]} | {cells[1]} | |")
  table = "\n".join(rows)
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump({"runs": runs, "summary": summary, "wall_seconds": timings}, f, indent=1,
              sort_keys=True)
  with open(FLAGS.out + ".md", "w") as f:
    f.write(table + "\n")
  return table


def main(argv):
  """Runs the missing runs of the grid (the table is rewritten after each), then prints it."""
  del argv
  grid = [(m, f, s) for f in FLAGS.fractions for s in FLAGS.seeds for m in FLAGS.methods]
  failed = []
  if not FLAGS.collect_only:
    lock = threading.Lock()

    def run_and_tabulate(run):
      try:
        _run(*run)
      except RuntimeError as e:  # Keep going: the other runs and the table still count.
        print(e, file=sys.stderr, flush=True)
        failed.append("_".join(run))
      with lock:
        write_table()

    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
      list(pool.map(run_and_tabulate, grid))
  print(write_table())
  if failed:
    raise SystemExit(f"failed runs (rerun to retry; finished runs are kept): {failed}")


if __name__ == "__main__":
  app.run(main)
