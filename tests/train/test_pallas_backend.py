"""experiments/tiny.py trained with the Pallas kernels (interpret mode on CPU) vs the XLA path."""

import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.model import create_model
from ernie5_jax.train import optimizer
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib

NUM_STEPS = 3


def _tiny_config(data_dir, **model):
  """experiments/tiny.py (its model and objective) on the tiny data build, short rows."""
  config = runpy.run_path("experiments/tiny.py")["get_config"]()
  config.data.update(dataset="digits_multimodal/tiny", data_dir=data_dir, seq_len=64,
                     global_batch_size=2)
  config.model.update(model)
  config_lib.validate(config)
  return config


def _losses(config, batches):
  """Per-step training losses of NUM_STEPS steps from the seed's initial state."""
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, state = state_lib.init_train_state(lambda: create_model(config), tx)
  train_step = step_lib.make_train_step(config, graphdef, tx, schedule)
  losses = []
  for batch in batches:
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "shared_data")


@pytest.mark.slow
def test_pallas_kernels_train_like_the_xla_path(data_dir):
  xla = _tiny_config(data_dir, attention="xla", moe_dispatch="gather")
  pallas = _tiny_config(data_dir, attention="pallas", moe_dispatch="pallas")
  data = input_pipeline.create_train_iterator(xla)
  batches = [jax.tree.map(jnp.asarray, next(data)) for _ in range(NUM_STEPS)]
  xla_losses, pallas_losses = _losses(xla, batches), _losses(pallas, batches)
  assert np.all(np.isfinite(xla_losses)), xla_losses
  # f32 kernels that only change the summation order: equal to ~1e-6 relative per step.
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-4)
