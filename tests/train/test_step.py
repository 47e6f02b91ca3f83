"""Tests of the jitted train step on the real Decoder (one compile for the whole module)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import input_pipeline
from ernie5_jax.model import create_model
from ernie5_jax.model.router import RouterBias
from ernie5_jax.train import optimizer
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib

from tiny_train_config import make_tiny_config

RATE, LB_WEIGHT, Z_WEIGHT = 1e-2, 0.01, 0.001


@pytest.fixture(scope="module")
def setup():
  config = make_tiny_config()
  config.router.update(bias_update_rate=RATE, load_balance_weight=LB_WEIGHT,
                       z_loss_weight=Z_WEIGHT)
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, state = state_lib.init_train_state(lambda: create_model(config), tx)
  data = input_pipeline.create_train_iterator(config)
  return dict(config=config, schedule=schedule, graphdef=graphdef, state=state,
              train_step=step_lib.make_train_step(config, graphdef, tx, schedule),
              batches=[next(data) for _ in range(8)])


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _naive_ce(logits, targets, mask):
  """Masked mean of -log softmax(logits)[target], in float64."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return float((nll * mask).sum() / max(mask.sum(), 1.0))


def test_step_loss_metrics_router_bias_and_donation(setup):
  s = setup
  batch = s["batches"][0]

  @jax.jit
  def model_forward(params, rest, b):
    model = nnx.merge(s["graphdef"], params, rest, copy=True)
    return model(b["tokens"], b["positions"], b["segment_ids"], b["group_ids"])

  before = _copy(s["state"])
  logits, aux = model_forward(before.params, before.rest, batch)
  donated = _copy(before)
  leaf = jax.tree.leaves(donated.params)[0]
  after, metrics = s["train_step"](donated, batch)
  assert leaf.is_deleted()  # the state was donated

  # Loss = masked CE + weighted router losses; per-modality CE with its token counts.
  ce = _naive_ce(logits, batch["targets"], batch["loss_mask"])
  np.testing.assert_allclose(float(metrics["ce_loss"]), ce, rtol=1e-5)
  want = ce + LB_WEIGHT * float(aux["load_balance_loss"]) + Z_WEIGHT * float(aux["z_loss"])
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  for m, name in enumerate(input_pipeline.MODALITIES[:2]):
    m_mask = batch["loss_mask"] * (batch["modality"] == m)
    np.testing.assert_allclose(float(metrics[f"loss/{name}"]),
                               _naive_ce(logits, batch["targets"], m_mask), rtol=1e-5)
    assert float(metrics[f"tokens/{name}"]) == m_mask.sum()
  load = np.asarray(aux["expert_load"])  # [moe_layers, experts]
  np.testing.assert_allclose(float(metrics["router/load_imbalance"]),
                             np.mean(load.max(-1) / load.mean(-1)), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["router/entropy"]),
                             float(np.mean(aux["router_entropy"])), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["learning_rate"]), float(s["schedule"](0)))
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["params_finite"]) == 1.0
  assert int(after.step) == 1

  # RouterBias moves by rate * sign(mean(load) - load) of this step's loads, not by grads.
  (bias_before,) = jax.tree.leaves(before.rest.filter(RouterBias))
  (bias_after,) = jax.tree.leaves(after.rest.filter(RouterBias))
  np.testing.assert_allclose(np.asarray(bias_after) - np.asarray(bias_before),
                             RATE * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)
  # Only nnx.Param leaves are trained.
  assert jax.tree.structure(after.params) == jax.tree.structure(before.params)
  variables = jax.tree.leaves(after.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert all(isinstance(v, nnx.Param) for v in variables)


def test_stepping_many_times_compiles_once(setup):
  state = _copy(setup["state"])
  losses = []
  for batch in setup["batches"]:
    state, metrics = setup["train_step"](state, batch)
    losses.append(float(metrics["loss"]))
  assert setup["train_step"]._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == len(setup["batches"]) and all(np.isfinite(losses))
