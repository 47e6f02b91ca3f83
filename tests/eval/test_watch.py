"""The continuous eval job (eval/watch.py) beside a live training subprocess.

The watcher starts before the trainer has written anything and follows it to its final
step; every evaluation is checked when it happens (the model it reads is a committed
checkpoint, no step twice), then the TensorBoard events and a restarted watcher.
"""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from ernie5_jax import store
from ernie5_jax.eval import job, watch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 8
# The trainer: the tests' tiny model, a checkpoint every 2 steps, only 2 kept (its rotation
# deletes steps while the watcher runs), no decode timing (eval.decode_tokens=0).
TRAIN = f"""
import sys
from tiny_train_config import make_tiny_config
from ernie5_jax.train import loop
config = make_tiny_config(num_steps={NUM_STEPS}, checkpoint_every=2, log_every=2,
                          keep_checkpoints=2)
config.model.top_k = 1
config.elastic.expert_counts = (2,)
config.eval.update(num_batches=1, decode_tokens=0)
loop.train_and_evaluate(config, sys.argv[1])
"""


def _params(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
  """(train workdir, eval dir, steps evaluated, params read per step) of a live run."""
  base = tmp_path_factory.mktemp("watch")
  workdir, out = str(base / "run"), str(base / "run" / "eval")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "train")]))
  trainer = subprocess.Popen([sys.executable, "-c", TRAIN, workdir], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  read, evaluate = {}, job.evaluate

  def checked_evaluate(loc, config, step_out, writer):
    assert loc.step not in read, f"step {loc.step} evaluated twice"
    snapshot = loc.model_dir.parent
    # A committed orbax step: every item and the metadata written at finalisation.
    assert {"model", "optimizer", "step", "_CHECKPOINT_METADATA"} <= {
        p.name for p in snapshot.iterdir()}
    read[loc.step] = _params(store.restore_model(loc, config)[1])
    return evaluate(loc, config, step_out, writer)

  try:
    job.evaluate = checked_evaluate
    steps = watch.watch(workdir, out, timeout_secs=300, poll_secs=0.2)
  finally:
    job.evaluate = evaluate
    output = trainer.communicate(timeout=300)[0]
  assert trainer.returncode == 0, output[-3000:]
  return workdir, out, steps, read


@pytest.mark.slow
def test_watch_evaluates_each_committed_checkpoint_once(watched):
  workdir, out, steps, read = watched
  assert steps == sorted(set(steps)) == sorted(read) and steps[-1] == NUM_STEPS
  assert set(steps) <= {2, 4, 6, 8}  # Only checkpoint steps.
  assert watch.evaluated_steps(out) == steps
  # What was read is what the trainer committed (the steps its rotation kept).
  for step in store_steps(workdir):
    if step in read:
      _, model = store.restore_model(workdir, step=step)
      for a, b in zip(read[step], _params(model)):
        np.testing.assert_array_equal(a, b)
  assert not os.listdir(os.path.join(out, watch.SNAPSHOT_DIR))  # Every snapshot released.


def store_steps(workdir: str) -> list[int]:
  ckpts = os.path.join(workdir, store.CHECKPOINT_SUBDIR)
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


@pytest.mark.slow
def test_watch_writes_tensorboard_beside_training(watched):
  workdir, out, steps, _ = watched
  seen = {}
  for path in glob.glob(os.path.join(out, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        seen.setdefault(value.tag, []).append(event.step)
  assert sorted(seen["eval/loss_all"]) == steps  # One point per evaluated step.
  assert sorted(seen["eval/family/d2_e2_k1/loss/text"]) == steps
  assert "eval/routing/entropy/text" in seen and "eval/family_table" in seen
  assert sorted(seen["eval/routing_plots/frequency"]) == steps
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))  # The training curves.


@pytest.mark.slow
def test_a_restarted_watch_skips_evaluated_steps(watched, capsys):
  workdir, out, _, _ = watched
  assert watch.watch(workdir, out, timeout_secs=5, poll_secs=0.2) == []
  assert f"step {NUM_STEPS}: already evaluated" in capsys.readouterr().out


def test_watch_needs_a_training_workdir(tmp_path):
  (tmp_path / "5" / "model").mkdir(parents=True)
  with pytest.raises(store.CheckpointNotFoundError, match="is one checkpoint; expected a "
                     "training workdir"):
    watch.checkpoints_dir(str(tmp_path / "5"))
  assert watch.checkpoints_dir(str(tmp_path / "not_yet")).name == store.CHECKPOINT_SUBDIR
