"""Fault matrix: the CLI under kills, corrupt files, concurrent runs, bad resumes and a full disk.

  .venv/bin/python benchmarks/fault_matrix.py --kills=20 [--seed=0]

Runs the tiny model (tests/test_main.py's shape) on synthetic data for 40 steps with a
checkpoint every 4, as subprocesses of `python -m ernie5_jax.main`, and prints one row per
fault: what happened, what was lost, how many error lines the user saw and whether a
traceback was printed. Kills: one run is SIGKILLed at N random moments (each restart resumes)
and its final parameters are compared bit for bit with an uninterrupted run; "lost" is the
committed steps the restart did not resume from (0 expected). The full-disk row needs a
tmpfs mount (root); elsewhere it is reported as not run. Results: benchmarks/results/
fault_matrix.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # This process only reads checkpoints.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
FLAGS = [
    "--config=experiments/tiny.py:synthetic", "--config.model.d_model=32",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
    "--config.model.rope_sections=(4,2,2)", "--config.model.num_layers=2",
    "--config.model.num_dense_layers=1", "--config.model.num_experts=4",
    "--config.model.num_shared_experts=0", "--config.model.expert_hidden=16",
    "--config.model.dense_hidden=64", "--config.data.seq_len=16",
    "--config.data.global_batch_size=4", "--config.optimizer.warmup_steps=2",
    f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
    "--config.train.log_every=4",
]


def _env(cache: str) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cmd(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "ernie5_jax.main", *FLAGS, f"--workdir={workdir}", *extra]


def _run(env, workdir, *extra, flags=None) -> subprocess.CompletedProcess:
  cmd = _cmd(workdir, *extra) if flags is None else [sys.executable, "-m", "ernie5_jax.main",
                                                      *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _params(workdir: str, step: int) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "model"))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _lines(proc) -> tuple[int, bool, str]:
  """(error lines, traceback printed?, the last line) of a run's stderr."""
  err = proc.stderr.strip().splitlines()
  errors = [l for l in err if l.startswith("error:")]
  return len(errors), any("Traceback" in l for l in err), (err[-1] if err else "")


def _resumed(proc) -> int:
  """The step a run resumed from (0: it started from scratch)."""
  m = re.search(r"Resumed from the checkpoint at step (\d+)", proc.stderr)
  return int(m.group(1)) if m else 0


def _kill_moment(proc, workdir, rng) -> str:
  """Waits for a random kill moment of a running invocation; returns what it was.

  One kill in five lands in start-up or the first compile (a random 0.5-10 s); the others when
  the run has committed a random later step, plus up to 0.6 s: inside training steps and
  inside asynchronous checkpoint writes.
  """
  if rng.random() < 0.2:
    delay = rng.uniform(0.5, 10.0)
    time.sleep(delay)
    return f"after {delay:.1f} s"
  start = max(_steps(workdir) or [0])
  target = rng.randrange(start + 4, NUM_STEPS + 1, 4) if start < NUM_STEPS else NUM_STEPS
  while proc.poll() is None and max(_steps(workdir) or [0]) < target:
    time.sleep(0.02)
  time.sleep(rng.uniform(0.0, 0.6))
  return f"after step {target} committed"


def _resume_step(text: str) -> int | None:
  """The step a run's log says it resumed from (0: initialised); None if it got no further."""
  m = re.search(r"Resumed from the checkpoint at step (\d+)", text)
  if m:
    return int(m.group(1))
  return 0 if "Initialised a new model" in text else None


def kills(env, root, reference, n, rng, per_run=4) -> list[dict]:
  """SIGKILLs runs at n random moments (_kill_moment), per_run per run, each followed by a
  restart; each run is then finished uninterrupted and its end compared bit for bit.

  lost_steps: the newest committed step at the kill minus the step the next invocation that
  got that far resumed from (an invocation killed before restoring is skipped over).
  """
  rows = []
  while len(rows) < n:
    workdir = os.path.join(root, f"killed{len(rows)}")
    logs, chain = [], []
    for _ in range(min(per_run, n - len(rows))):
      logs.append(os.path.join(root, f"log{len(rows) + len(chain)}"))
      with open(logs[-1], "w") as log:
        proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=log)
        moment = _kill_moment(proc, workdir, rng)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
      ckpts = os.path.join(workdir, "checkpoints")
      writing = os.path.isdir(ckpts) and any("tmp" in d for d in os.listdir(ckpts))
      chain.append({"moment": moment, "process_had_exited": finished,
                    "committed_at_kill": _steps(workdir), "inside_a_checkpoint_write": writing})
    final = _run(env, workdir)
    later = [open(l).read() for l in logs[1:]] + [final.stderr]
    for i, kill in enumerate(chain):
      resumed = next((r for r in map(_resume_step, later[i:]) if r is not None), None)
      kill["resumed_from"] = resumed
      kill["lost_steps"] = max(kill["committed_at_kill"] or [0]) - (resumed or 0)
    identical = final.returncode == 0 and _same(_params(workdir, NUM_STEPS), reference)
    for kill in chain:
      kill.update(final_exit=final.returncode, identical=identical)
    rows += chain
    shutil.rmtree(workdir)
  return rows


def _corrupt(kind: str, step_dir: str) -> None:
  if kind == "truncated arrays":
    for f in glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True):
      os.truncate(f, 16)
  elif kind == "garbage _METADATA":
    with open(os.path.join(step_dir, "model", "_METADATA"), "w") as f:
      f.write("{garbage")
  elif kind == "garbage iterator state":
    with open(glob.glob(os.path.join(step_dir, "data", "*.json"))[0], "w") as f:
      f.write("{garbage")


def faults(env, root, finished) -> list[dict]:
  """One row per fault of the matrix (module doc)."""
  rows = []

  def row(fault, proc, outcome, lost="0"):
    errors, traceback, last = _lines(proc)
    rows.append({"fault": fault, "outcome": outcome, "lost": lost, "exit": proc.returncode,
                 "error_lines": errors, "traceback": traceback, "message": last[:300]})

  for kind in ("truncated arrays", "garbage _METADATA", "garbage iterator state"):
    w = os.path.join(root, kind.replace(" ", "_"))
    shutil.copytree(finished, w)
    _corrupt(kind, os.path.join(w, "checkpoints", str(NUM_STEPS)))
    ev = _run(env, w, flags=["--mode=eval", f"--checkpoint={w}", f"--workdir={w}/eval"])
    row(f"corrupt newest checkpoint ({kind}): eval", ev,
        "eval refused, naming the bad step and the older one" if ev.returncode == 2 else
        "eval ran (the corruption is in what eval does not read)")
    tr = _run(env, w, f"--config.train.num_steps={NUM_STEPS + 4}")
    aside = glob.glob(os.path.join(w, "checkpoints", f"{NUM_STEPS}.corrupt-*"))
    row(f"corrupt newest checkpoint ({kind}): train", tr,
        f"resumed from step {_resumed(tr)}, step {NUM_STEPS} moved aside"
        if aside else f"resumed from step {_resumed(tr)}",
        lost=f"{NUM_STEPS - _resumed(tr)} steps (only the corrupt one)")

  w = os.path.join(root, "concurrent")
  first = subprocess.Popen(_cmd(w, "--config.train.num_steps=4000"), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while not _steps(w):  # The first run is training (and holds the lock).
    time.sleep(0.1)
  second = _run(env, w, "--config.optimizer.learning_rate=1e-3",
                "--config.train.num_steps=4000")
  alive = first.poll() is None
  first.send_signal(signal.SIGKILL)
  first.wait()
  with open(os.path.join(w, "config.json")) as f:
    lr = json.load(f)["optimizer"]["learning_rate"]
  row("second run on a live workdir (other learning rate)", second,
      ("refused" if second.returncode == 2 else "NOT refused") +
      f"; the first was {'still training' if alive else 'GONE'}; config.json keeps lr={lr}")

  for fault, extra in (("resume with another global batch size",
                        ["--config.data.global_batch_size=8"]),
                       ("resume with another d_model", ["--config.model.d_model=64"])):
    w = os.path.join(root, fault.replace(" ", "_"))
    shutil.copytree(finished, w)
    before = open(os.path.join(w, "config.json")).read()
    proc = _run(env, w, f"--config.train.num_steps={NUM_STEPS + 4}", *extra)
    same = open(os.path.join(w, "config.json")).read() == before
    row(fault, proc, ("refused" if proc.returncode == 2 else "ran") +
        ("; config.json unchanged" if same else "; config.json REWRITTEN"))

  w = os.path.join(root, "longer")
  shutil.copytree(finished, w)
  proc = _run(env, w, f"--config.train.num_steps={NUM_STEPS + 8}")
  said = "num_steps changed from 40 to 48" in proc.stderr
  row("resume with a larger num_steps", proc,
      "trained on; the schedule change is logged" if said else "trained on SILENTLY")

  for fault, flags in (("--config file missing", ["--config=experiments/nope.py"]),
                       ("--config.mesh.data=2 on one device", FLAGS + ["--config.mesh.data=2"]),
                       ("--config.data.seq_len=1", FLAGS + ["--config.data.seq_len=1"])):
    proc = _run(env, root, flags=flags + [f"--workdir={root}/bad"])
    row(fault, proc, "refused before training" if proc.returncode == 2 else "NOT refused")

  disk = os.path.join(root, "disk")
  os.makedirs(disk)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", disk],
                           capture_output=True).returncode == 0
  if mounted:
    try:
      proc = _run(env, os.path.join(disk, "run"))
      left = [p for p in glob.glob(os.path.join(disk, "run", "checkpoints", "*"))
              if "tmp" in os.path.basename(p)]
      good = _steps(os.path.join(disk, "run"))
      row("disk full (1.2 MB tmpfs)", proc, f"stopped; committed steps {good} intact; "
          f"{len(left)} partial directories left", lost="the steps after the last commit")
      again = _run(env, os.path.join(disk, "run"))
      row("restart on the still-full disk", again, "stopped again in one line")
    finally:
      subprocess.run(["umount", disk], check=False)
  return rows


def main() -> None:
  """Runs the matrix and prints the table (module doc)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                     "fault_matrix.json"))
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="fault_matrix_")
  env = _env(os.path.join(root, "jax_cache"))
  t0 = time.time()
  reference = os.path.join(root, "reference")
  proc = _run(env, reference)
  assert proc.returncode == 0, proc.stderr[-2000:]
  want = _params(reference, NUM_STEPS)
  fault_rows = faults(env, root, reference)
  for r in fault_rows:
    print(f"| {r['fault']} | {r['outcome']} | {r['lost']} | exit {r['exit']}, "
          f"{r['error_lines']} error line(s), traceback: {'yes' if r['traceback'] else 'no'} |",
          flush=True)
  kill_rows = kills(env, root, want, args.kills, random.Random(args.seed))
  identical = sum(r["identical"] for r in kill_rows)
  lost = sum(r["lost_steps"] for r in kill_rows)
  writes = sum(r["inside_a_checkpoint_write"] for r in kill_rows)
  early = sum(r["moment"].endswith(" s") for r in kill_rows)
  print(f"| SIGKILL at {len(kill_rows)} random moments ({early} in start-up/compile, {writes} "
        f"inside a checkpoint write), each followed by a restart | {identical}/"
        f"{len(kill_rows)} final states bit-identical to the uninterrupted run | {lost} committed "
        f"steps lost | final runs exit {sorted({r['final_exit'] for r in kill_rows})} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"faults": fault_rows, "kills": kill_rows, "seconds": round(time.time() - t0)},
              f, indent=1)
  print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
