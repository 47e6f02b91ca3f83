"""End to end: a tiny M2CP config through `python -m ernie5_jax.main`, then a resume."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_FLAGS = [
    "--config=experiments/m2cp_shapes.py:frac=0.1,seed=1",
    "--config.data.dataset=shapes3d/tiny", "--config.data.num_points=32",
    "--config.data.labelled_batch_size=4", "--config.data.unlabelled_batch_size=6",
    "--config.data.eval_batch_size=24", "--config.model.knn=4",
    "--config.model.point_channels=(8,8)", "--config.model.view_channels=(4,8)",
    "--config.model.mesh_channels=8", "--config.model.mesh_conv_layers=1",
    "--config.model.pool_dim=16", "--config.model.embed_dim=32", "--config.model.proj_dim=8",
    "--config.loss.rampup_steps=2", "--config.loss.pseudo_label_threshold=0.1",
    "--config.optimizer.warmup_steps=1", "--config.train.log_every=2",
    "--config.train.eval_every=4", "--config.train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: a private data dir and a shared persistent compilation cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              ERNIE5_DATA_DIR=str(tmp_path_factory.mktemp("data")),
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(env, workdir, steps):
  cmd = [sys.executable, "-m", "ernie5_jax.main", *TINY_FLAGS,
         f"--config.train.num_steps={steps}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


@pytest.mark.slow
def test_train_eval_checkpoint_and_resume(env, tmp_path):
  workdir = str(tmp_path / "run")
  log = _run(env, workdir, 4)
  assert "unlabelled losses: True" in log
  assert "m2cp=" in log and "nt_xent=" in log and "pseudo/fraction=" in log
  with open(os.path.join(workdir, "eval_metrics.json")) as f:
    result = json.load(f)["4"]
  for key in ("accuracy/fused", "accuracy/point", "map/mean", "map/view->mesh"):
    assert 0 <= result[key] <= 1, key
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  log = _run(env, workdir, 6)  # Resumes at step 4 and runs two more steps.
  assert "Resumed from the checkpoint at step 4" in log
  assert "[6] ce/fused=" in log
  lines = [l for l in log.splitlines() if "[6]" in l and " loss=" in l]
  assert lines, log[-2000:]
  assert math.isfinite(float(lines[0].split(" loss=")[1].split(",")[0]))
