"""In-process tests of train_and_evaluate on the real Decoder."""

import numpy as np
import pytest

from ernie5_jax import input_pipeline
from ernie5_jax.train import checkpoint, loop, optimizer
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
  with pytest.raises(loop.NonFiniteLossError) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert f"non-finite loss (nan) at step {BAD_STEP}: stopping without saving" in message
  assert "the last good checkpoint (step 2)" in message
  manager = checkpoint.create_manager(str(tmp_path), keep=3, async_save=False)
  assert manager.all_steps() == [2]  # step 4 (after the bad step) was never written
  # The kept checkpoint restores into the model the config builds.
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(config, tx)
  restored = checkpoint.restore(manager, abstract, input_pipeline.create_train_iterator(config))
  assert int(restored.step) == 2


def test_unwritable_workdir_fails_before_anything_is_built(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(checkpoint.WorkdirError, match="--workdir="):
    loop.train_and_evaluate(make_tiny_config(), str(tmp_path / "file" / "run"))
