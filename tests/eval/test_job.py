"""The eval job end to end: train a tiny model in-process, then `--mode=eval` in a fresh process.

Also restore_model / locate (store.py) on every path form they accept, and the
config.json the trainer writes.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import elastic_export
from ernie5_jax import store
from ernie5_jax.eval import job
from ernie5_jax.input_pipeline import multimodal
from ernie5_jax.model import elastic
from ernie5_jax.train import loop

from tiny_train_config import make_tiny_config  # tests/train (pytest.ini pythonpath)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 3  # Checkpoints at steps 2 and 3.


def _config():
  # top_k 1 and one smaller expert count: a family of two (full 2,4,1 and 2,2,1), so the
  # subprocess times only two decodes. Synthetic text + image data: two modalities.
  config = make_tiny_config(num_steps=NUM_STEPS, checkpoint_every=2, log_every=1)
  config.model.top_k = 1
  config.elastic.expert_counts = (2,)
  config.eval.update(num_batches=2, decode_tokens=4)
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir trained NUM_STEPS steps by the real trainer."""
  path = str(tmp_path_factory.mktemp("eval_job") / "run")
  loop.train_and_evaluate(_config(), path)
  return path


@pytest.fixture(scope="module")
def eval_out(workdir, tmp_path_factory):
  """stdout and out dir of `python -m ernie5_jax.main --mode=eval` in a fresh process."""
  out = str(tmp_path_factory.mktemp("eval_out"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "ernie5_jax.main", "--mode=eval", f"--checkpoint={workdir}",
       f"--workdir={out}", "--config=experiments/tiny.py:synthetic",
       "--config.eval.num_batches=3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc.stdout, out


def test_trainer_writes_its_config(workdir):
  stored = store.load_config(workdir)
  assert stored.to_dict() == _config().to_dict()
  assert isinstance(stored.model.rope_sections, tuple)


def test_restore_model_from_every_path_form(workdir):
  ckpts = os.path.join(workdir, store.CHECKPOINT_SUBDIR)
  assert store.locate(workdir).step == NUM_STEPS
  assert store.locate(ckpts).step == NUM_STEPS
  assert store.locate(workdir, step=2).step == 2
  assert store.locate(os.path.join(ckpts, "2")).step == 2
  config, model = store.restore_model(workdir)
  assert config.to_dict() == _config().to_dict()
  _, latest = store.restore_model(os.path.join(ckpts, str(NUM_STEPS)))
  _, first = store.restore_model(ckpts, step=2)
  same = jax.tree.map(np.array_equal, nnx.state(model), nnx.state(latest))
  assert all(jax.tree.leaves(same))
  differ = jax.tree.map(np.array_equal, nnx.state(model, nnx.Param), nnx.state(first, nnx.Param))
  assert not all(jax.tree.leaves(differ))  # Step 2 is another state.


def test_restore_model_of_an_exported_submodel(workdir, tmp_path):
  config, model = store.restore_model(workdir)
  sub = elastic.SubModel(2, 2, 1)
  sub_config, sub_state = elastic_export.export_submodel(config, nnx.state(model), sub)
  out = elastic_export.write_submodel(str(tmp_path / "sub"), sub_config, sub_state, sub=sub)
  loaded_config, loaded = store.restore_model(out)
  assert loaded_config.model.num_experts == 2
  assert store.locate(out).step is None
  same = jax.tree.map(np.array_equal, nnx.state(loaded), sub_state)
  assert all(jax.tree.leaves(same))


def test_restore_model_errors_name_the_path(workdir, tmp_path):
  with pytest.raises(store.CheckpointNotFoundError, match="does not exist: expected a "
                     "training workdir"):
    store.restore_model(str(tmp_path / "missing"))
  with pytest.raises(store.CheckpointNotFoundError,
                     match=re.escape(f"{tmp_path}' holds no checkpoint: expected")):
    store.restore_model(str(tmp_path))
  with pytest.raises(store.CheckpointNotFoundError, match=r"step=7 .* holds steps \[2, 3\]"):
    store.locate(workdir, step=7)
  # A run without config.json: restoring needs the config.
  bare = tmp_path / "bare"
  shutil.copytree(os.path.join(workdir, store.CHECKPOINT_SUBDIR), bare / "checkpoints")
  with pytest.raises(store.CheckpointNotFoundError, match="no config.json next to"):
    store.restore_model(str(bare))
  config, _ = store.restore_model(str(bare), _config())
  assert config.model.top_k == 1
  wrong = _config()
  wrong.model.num_experts = 8
  with pytest.raises(store.CheckpointMismatchError, match="experts"):
    store.restore_model(str(bare), wrong)


def test_eval_reads_the_eval_split():
  config = _config()
  config.data.source = "digits_multimodal"
  eval_cfg = job.eval_data_config(config)
  assert multimodal.MultimodalConfig.from_config(eval_cfg.data).split == "test"
  assert config.data.split == "train"  # The training config is not modified.


@pytest.mark.slow
def test_eval_mode_writes_the_family_report(eval_out):
  stdout, out = eval_out
  report = json.load(open(os.path.join(out, job.REPORT_FILE)))
  assert report["step"] == NUM_STEPS and report["split"].startswith("none (synthetic")
  assert report["num_batches"] == 3  # The --config.eval.num_batches override.
  config = _config()
  subs = [elastic.SubModel(**r["submodel"]) for r in report["submodels"]]
  assert subs == elastic.family(config) == [elastic.SubModel(2, 4, 1), elastic.SubModel(2, 2, 1)]
  for row, sub in zip(report["submodels"], subs):
    counts = elastic_export.param_counts(config, sub)
    assert row["total_params"] == counts["total"]
    assert row["active_params_per_token"] == counts["active_per_token"]
    assert set(row["loss"]) == set(row["accuracy"]) == {"text", "image"}
    assert all(np.isfinite(v) and v > 0 for v in row["loss"].values())
    assert all(0 <= v <= 1 for v in row["accuracy"].values())
    assert row["decode_tokens_per_sec"] > 0
  assert report["submodels"][0]["full"] and not report["submodels"][1]["full"]
  assert "2,4,1 (full)" in stdout and "decode tok/s" in stdout


@pytest.mark.slow
def test_eval_mode_writes_the_routing_analysis(eval_out):
  _, out = eval_out
  routing = json.load(open(os.path.join(out, job.ROUTING_FILE)))
  assert routing["num_layers"] == 1 and routing["num_experts"] == 4
  assert routing["tokens"]["text"] > 0 and routing["tokens"]["image"] > 0
  for name in ("text", "image"):
    freq = np.array(routing["frequency"][name])  # [layers, experts]
    np.testing.assert_allclose(freq.sum(-1), 1.0)
    assert 0 <= routing["entropy"][name]["mean"] <= 1
  iou = routing["top_expert_iou"]["text-image"]
  assert len(iou["per_layer"]) == 1 and 0 <= iou["mean"] <= 1
  for name in ("routing_frequency.png", "routing_iou.png", "routing_entropy.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_config_is_the_stored_one_plus_overrides(workdir, tmp_path):
  flags_config = _config()
  flags_config.eval.num_batches = 9
  flags_config.model.top_k = 2  # Not named as an override: the stored value stays.
  loc = store.locate(workdir)
  config = job.resolve_config(loc, flags_config, ("eval.num_batches",))
  assert config.eval.num_batches == 9 and config.model.top_k == 1
  with pytest.raises(job.config_lib.ConfigError, match="need --config"):
    job.resolve_config(loc, None, ("eval.num_batches",))
  # Without a stored config.json the command line's config is used whole.
  bare = tmp_path / "bare"
  shutil.copytree(os.path.join(workdir, store.CHECKPOINT_SUBDIR), bare / "checkpoints")
  bare_loc = store.locate(str(bare))
  assert job.resolve_config(bare_loc, flags_config, ()).model.top_k == 2
  with pytest.raises(store.CheckpointNotFoundError, match="pass the training run's"):
    job.resolve_config(bare_loc, None, ())
