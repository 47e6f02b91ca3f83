"""The continuous eval job: follow a training workdir, evaluate each new checkpoint once.

  python -m ernie5_jax.main --mode=eval --watch --checkpoint=workdirs/tiny \
      --workdir=workdirs/tiny/eval [--watch_timeout=3600]

Runs beside training (another process or host, as T5X / big_vision eval jobs do). orbax's
`checkpoint_utils.checkpoints_iterator` waits for checkpoints: it lists only finalized steps
(a step still being committed is a tmp directory, or lacks its commit marker on GCS) and
yields the newest one, copied first into a snapshot under <out>/snapshots/ (released after
its evaluation) so that the trainer's checkpoint rotation (train.keep_checkpoints) cannot
delete it mid-read. Each step is evaluated by eval/job.py `evaluate` into <out>/<step>/
(family_report.json, routing.json, PNGs) and TensorBoard events in <out> at that step.

Resumable: a step whose <out>/<step>/family_report.json exists (written last, atomically)
is not evaluated again by a restarted job. Checkpoints written while one is being evaluated
are skipped except the newest (the iterator yields the latest step), as in T5X's eval.
Stops when the step evaluated (or skipped) is the trainer's final one (train.num_steps of
the config.json the trainer writes), or when no new checkpoint came for `timeout_secs`.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging
from clu import metric_writers
from etils import epath
from orbax.checkpoint import checkpoint_utils

from ernie5_jax import store
from ernie5_jax.eval import job

SNAPSHOT_DIR = "snapshots"  # Under the eval workdir: copies of the steps being evaluated.


def checkpoints_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints of a training workdir (which may not exist yet), or the dir given."""
  p = store.resolve_path(workdir)
  if (p / store.MODEL_ITEM).is_dir():
    raise store.CheckpointNotFoundError(
        f"--checkpoint={workdir!r} is not accepted with --watch: it is one checkpoint; expected "
        "a training workdir (or its checkpoints/ directory) to follow")
  return p if p.name == store.CHECKPOINT_SUBDIR else p / store.CHECKPOINT_SUBDIR


def evaluated_steps(out_dir: str) -> list[int]:
  """Steps with a complete report under out_dir (<step>/family_report.json), ascending."""
  if not os.path.isdir(out_dir):
    return []
  return sorted(int(d) for d in os.listdir(out_dir) if d.isdigit()
                and os.path.isfile(os.path.join(out_dir, d, job.REPORT_FILE)))


def _step_config(ckpts: epath.Path, model_dir: epath.Path, step: int,
                 config: ml_collections.ConfigDict | None, override_fields: tuple[str, ...]
                 ) -> tuple[store.CheckpointLocation, ml_collections.ConfigDict]:
  """The location of the snapshot model_dir of `step` and its config (stored + overrides)."""
  config_path = ckpts.parent / store.CONFIG_FILE
  loc = store.CheckpointLocation(model_dir=model_dir, step=step,
                                 config_path=config_path if config_path.exists() else None)
  return loc, job.resolve_config(loc, config, override_fields)


def watch(workdir: str, out_dir: str, *, config: ml_collections.ConfigDict | None = None,
          override_fields: tuple[str, ...] = (), timeout_secs: float = 3600.0,
          poll_secs: float = 1.0) -> list[int]:
  """Evaluates each new checkpoint of the training run in workdir until its final step.

  Args:
    workdir: the training workdir (or its checkpoints/ dir); it may not exist yet.
    out_dir: the eval workdir: TensorBoard events, <step>/ report dirs, snapshots/.
    config, override_fields: as job.run_eval (the stored config.json, plus overrides).
    timeout_secs: stop after this long without a new checkpoint.
    poll_secs: seconds between looks at the checkpoints directory.
  Returns:
    The steps evaluated by this call (not those skipped as evaluated before), ascending.
  """
  ckpts = checkpoints_dir(workdir)
  store.ensure_writable(out_dir)
  out = store.resolve_path(out_dir)
  snapshots = out / SNAPSHOT_DIR  # Absolute, as orbax's snapshots need.
  done, evaluated = set(evaluated_steps(out_dir)), []
  if done:
    logging.info("Steps already evaluated in %s (skipped): %s.", out_dir, sorted(done))
  writer = metric_writers.create_default_writer(out_dir, asynchronous=False)
  steps = None
  try:
    while True:
      if steps is None:  # A new iterator first releases any snapshot a killed job left.
        steps = checkpoint_utils.checkpoints_iterator(
            ckpts, seconds_to_sleep=poll_secs, timeout=timeout_secs, snapshot_dir=snapshots,
            ignore_snapshot_errors=False)  # A failed copy must not be read as a checkpoint.
      try:
        step = next(steps)
      except StopIteration:
        print(f"no new checkpoint in {ckpts} for {timeout_secs:g} s: stopping", flush=True)
        return evaluated
      except FileNotFoundError as e:  # The trainer's rotation deleted the step being copied.
        logging.warning("Checkpoint deleted while it was copied (%s); looking again.", e)
        steps.close()
        steps = None
        continue
      loc, step_config = _step_config(ckpts, snapshots / str(step) / store.MODEL_ITEM, step,
                                      config, override_fields)
      if step in done:
        print(f"step {step}: already evaluated in {out_dir}; skipped", flush=True)
      else:
        job.evaluate(loc, step_config, str(out / str(step)), writer)
        done.add(step)
        evaluated.append(step)
      final = step_config.train.num_steps
      if step >= final:
        print(f"step {step} is the trainer's final step (train.num_steps={final}): "
              "stopping", flush=True)
        return evaluated
  finally:
    if steps is not None:
      steps.close()  # Releases the snapshot of the step it yielded last.
    writer.close()
