"""In-process tests of train_and_evaluate on the real Decoder."""

import jax
import numpy as np
import pytest

from ernie5_jax import input_pipeline
from ernie5_jax import store
from ernie5_jax.model import create_model
from ernie5_jax.train import checkpoint, loop, metrics, optimizer
from ernie5_jax.train import state as state_lib

from tiny_train_config import make_tiny_config

BAD_STEP = 3  # the step whose batch carries the injected NaN


def test_non_finite_loss_stops_without_saving_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch):
  config = make_tiny_config(num_steps=8, checkpoint_every=2, log_every=4)
  real_create_dataset = input_pipeline.create_dataset

  def poisoned(cfg, **kw):
    def inject(index, batch):
      if index == BAD_STEP - 1:  # batch k (0-based) is read by step k + 1
        batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
      return batch
    return real_create_dataset(cfg, **kw).map_with_index(inject)

  monkeypatch.setattr(input_pipeline, "create_dataset", poisoned)
  with pytest.raises(metrics.NonFiniteLossError) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert f"non-finite loss (nan) at step {BAD_STEP}: stopping without saving" in message
  assert "the last good checkpoint (step 2)" in message
  manager = checkpoint.create_manager(str(tmp_path), keep=3, async_save=False)
  assert manager.all_steps() == [2]  # step 4 (after the bad step) was never written
  # The kept checkpoint restores into the model the config builds.
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  restored = checkpoint.restore(manager, abstract, input_pipeline.create_train_iterator(config))
  assert int(restored.step) == 2
  # train.init_from: its weights start a fine-tuning run, at step 0 with a fresh optimizer.
  tuned = checkpoint.init_from(config, tx, str(tmp_path))
  assert int(tuned.step) == 0
  for got, want in zip(jax.tree.leaves(tuned.model_state()),
                       jax.tree.leaves(restored.model_state())):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for got, want in zip(jax.tree.leaves(tuned.opt_state),
                       jax.tree.leaves(tx.init(restored.params))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_init_from_a_path_without_checkpoint_fails_before_anything_is_built(tmp_path):
  config = make_tiny_config()
  config.train.init_from = str(tmp_path / "nothing_here")
  with pytest.raises(store.CheckpointNotFoundError, match="nothing_here"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir_fails_before_anything_is_built(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(store.WorkdirError, match="--workdir="):
    loop.train_and_evaluate(make_tiny_config(), str(tmp_path / "file" / "run"))
