"""train_and_evaluate on the embedded multimodal data (tiny build): objective metrics, resume."""

import jax
import numpy as np
import pytest
from clu import metric_writers

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.input_pipeline.multimodal import vocabulary_layout
from ernie5_jax.model import create_model
from ernie5_jax.model.heads import LossEMA
from ernie5_jax.train import checkpoint, loop, optimizer
from ernie5_jax.train import state as state_lib

from tiny_train_config import TINY_MODEL

NUM_STEPS = 16


def make_multimodal_config(data_dir):
  """The trainer tests' tiny model on digits_multimodal/tiny, with the full objective."""
  config = config_lib.default_config()
  config.data.update(source="digits_multimodal", dataset="digits_multimodal/tiny",
                     data_dir=data_dir, seq_len=64, global_batch_size=4)
  layout = vocabulary_layout(config.data)
  config.model.update(TINY_MODEL)
  config.model.update(vocab_size=layout.vocab_size, audio_levels=layout.audio_levels,
                      audio_codebook_size=layout.audio_codebook_size, audio_head_hidden=16)
  config.objective.audio_level_weights = (1.0,) * (layout.audio_levels - 1)
  config.optimizer.warmup_steps = 2
  config.train.update(num_steps=NUM_STEPS, log_every=4, checkpoint_every=8,
                      async_checkpoints=False)
  config_lib.validate(config)
  return config


class _Recorder(metric_writers.MetricWriter):
  """Keeps every write_scalars call: {step: {name: value}}."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update({k: float(v) for k, v in scalars.items()})

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return make_multimodal_config(str(tmp_path_factory.getbasetemp() / "shared_data"))


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
  """One training run of NUM_STEPS steps: (final state, logged scalars, workdir)."""
  workdir = str(tmp_path_factory.mktemp("multimodal_run"))
  recorder = _Recorder()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.metric_writers, "create_default_writer", lambda *a, **k: recorder)
    state = loop.train_and_evaluate(config, workdir)
  return state, recorder.scalars, workdir


def test_trains_with_per_modality_metrics(run):
  state, scalars, _ = run
  assert int(state.step) == NUM_STEPS
  logged = [scalars[s] for s in sorted(scalars) if "ce_loss" in scalars[s]]
  assert len(logged) == NUM_STEPS // 4
  first, last = logged[0], logged[-1]
  assert np.isfinite(last["loss"]) and last["ce_loss"] < first["ce_loss"]
  names = ["text", "image", "video", "audio", "text_mtp1", "audio_level2", "audio_level3",
           "audio_level4"]
  for name in names:
    for kind in ("loss", "accuracy"):
      values = [m[f"{kind}/{name}"] for m in logged if f"{kind}/{name}" in m]
      assert values and all(np.isfinite(values)), (kind, name)
  for name in ("text", "image", "audio"):
    assert 0 < last[f"loss_weight/{name}"] and np.isfinite(last[f"loss_ema/{name}"])
  # The posterior estimates are in the (checkpointed) non-trainable state.
  (ema,) = jax.tree.leaves(state.rest.filter(LossEMA))
  assert np.all(np.asarray(ema)[[0, 1, 3]] > 0)


def test_checkpointed_iterator_resumes_exactly(run, config):
  """Batches read after restoring the checkpoint's iterator state = an uninterrupted read."""
  state, _, workdir = run
  want = input_pipeline.create_train_iterator(config)
  want = [next(want) for _ in range(5)]
  it = input_pipeline.create_train_iterator(config)
  for _ in range(3):
    next(it)
  manager = checkpoint.create_manager(workdir + "/resume", keep=1, async_save=False)
  checkpoint.save(manager, state, it)
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  fresh = input_pipeline.create_train_iterator(config)
  restored = checkpoint.restore(manager, abstract, fresh)
  assert int(restored.step) == NUM_STEPS
  for expected in want[3:]:
    got = next(fresh)
    assert set(got) == set(expected)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_processes_read_disjoint_rows(config):
  shards = [next(input_pipeline.create_train_iterator(config, process_index=i, process_count=2))
            for i in range(2)]
  for b in shards:
    assert b["tokens"].shape == (2, config.data.seq_len)
    assert b["audio_codes"].shape == (2, config.data.seq_len, config.model.audio_levels)
  assert not np.array_equal(shards[0]["tokens"], shards[1]["tokens"])
