"""Tests of the warmup-stable-decay schedule, the weight-decay mask and clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax.train import optimizer


def _naive_wsd(step, *, peak, num_steps, warmup, decay_fraction, min_ratio):
  decay_steps = round(decay_fraction * num_steps)
  decay_start = num_steps - decay_steps
  if step < warmup:
    return peak * step / warmup
  if step < decay_start or decay_steps == 0:
    return peak
  return peak + (min_ratio * peak - peak) * (step - decay_start) / decay_steps


@pytest.mark.parametrize("warmup,decay_fraction", [(20, 0.2), (0, 0.5), (10, 0.0)])
def test_wsd_schedule_matches_the_piecewise_formula(warmup, decay_fraction):
  kw = dict(peak=3e-3, num_steps=200, warmup=warmup, decay_fraction=decay_fraction,
            min_ratio=0.1)
  schedule = optimizer.wsd_schedule(peak=3e-3, num_steps=200, warmup_steps=warmup,
                                    decay_fraction=decay_fraction, min_lr_ratio=0.1)
  for step in range(0, 201):
    np.testing.assert_allclose(float(schedule(step)), _naive_wsd(step, **kw), rtol=1e-5,
                               atol=1e-9, err_msg=f"step {step}")


def test_decay_mask_skips_norms_scales_and_biases():
  params = {"embed": {"table": jnp.ones((4, 2))},
            "moe_layers": {"layers": {"attn_norm": {"scale": jnp.ones((2, 2))},
                                      "attn": {"wq": jnp.ones((2, 2, 2))},
                                      "proj": {"bias": jnp.ones((2, 2))}}},
            "final_norm": {"scale": jnp.ones((2,))}}
  mask = optimizer.decay_mask(params)
  assert mask["embed"]["table"] and mask["moe_layers"]["layers"]["attn"]["wq"]
  assert not mask["moe_layers"]["layers"]["attn_norm"]["scale"]
  assert not mask["moe_layers"]["layers"]["proj"]["bias"]
  assert not mask["final_norm"]["scale"]


def test_adamw_decays_only_masked_leaves():
  config = config_lib.default_config()
  config.optimizer.update(warmup_steps=0, weight_decay=0.5, grad_clip_norm=1.0)
  tx, schedule = optimizer.create_optimizer(config)
  params = {"w": jnp.full((3, 3), 2.0), "norm": {"scale": jnp.full((3,), 2.0)}}
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  lr = float(schedule(0))
  np.testing.assert_allclose(updates["w"], -lr * 0.5 * 2.0, rtol=1e-6)  # decoupled decay
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_gradients_are_clipped_to_the_global_norm():
  config = config_lib.default_config()
  config.optimizer.update(grad_clip_norm=1.0, b1=0.9)
  tx, _ = optimizer.create_optimizer(config)
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.full((2, 2), 10.0)}  # global norm 20
  _, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")  # Adam's first moment = (1 - b1) * clipped grad
  np.testing.assert_allclose(mu["w"], 0.1 * 10.0 / 20.0, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.1, 10.0, np.nan])
def test_clip_by_global_norm_matches_optax(value):
  grads = {"a": jnp.full((3, 2), value), "b": {"c": jnp.arange(4.0) * value}}
  ours, _ = optimizer.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(got, want, rtol=1e-6)  # NaN where optax gives NaN
