"""The jitted train step: the objective (objective.py) + router aux losses, AdamW, router-bias
and loss-EMA updates."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ernie5_jax.train import objective
from ernie5_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def router_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Expert-load imbalance (max/mean load) per MoE layer and averaged, router entropy."""
  load = aux["expert_load"]  # [moe_layers, experts]
  if load.shape[0] == 0:
    return {}
  imbalance = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)  # [layers]
  metrics = {"router/load_imbalance": jnp.mean(imbalance),
             "router/entropy": jnp.mean(aux["router_entropy"])}
  for layer in range(load.shape[0]):
    metrics[f"router/load_imbalance_layer{layer}"] = imbalance[layer]
  return metrics


def loss_and_metrics(params: nnx.State, rest: nnx.State, batch: Batch, *,
                     graphdef: nnx.GraphDef, config: ml_collections.ConfigDict
                     ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """Returns (total loss, (metrics, aux)) of the objective (objective.py) on one batch."""
  # copy=True: `rest` Variables were created at the outer (jit) trace level.
  model = nnx.merge(graphdef, params, rest, copy=True)
  loss, (metrics, aux) = objective.compute_loss(model, batch, config=config)
  metrics.update(router_metrics(aux))
  return loss, (metrics, aux)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch; returns (new state, scalar metrics)."""
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)  # grads w.r.t. params only
  (_, (metrics, aux)), grads = grad_fn(state.params, state.rest, batch, graphdef=graphdef,
                                       config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Aux-loss-free balancing from this step's loads. Inside one jit the model's sum over
  # tokens already spans the global batch, whatever the sharding.
  model = nnx.merge(graphdef, params, state.rest)
  model.update_router_bias(jax.lax.stop_gradient(aux["expert_load"]),
                           config.router.bias_update_rate)
  model.loss_ema[...] = jax.lax.stop_gradient(aux["loss_ema"])  # Posterior weighting's estimate.
  _, _, rest = nnx.split(model, nnx.Param, ...)
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["param_norm"] = optax.global_norm(params)
  # 1.0 iff every new parameter is finite (a finite loss can still lead to inf params).
  metrics["params_finite"] = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])).astype(jnp.float32)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule) -> Any:
  """Returns train_step jitted with the state donated: fn(state, batch) -> (state, metrics)."""
  fn = functools.partial(train_step, graphdef=graphdef, config=config, tx=tx, schedule=schedule)
  return jax.jit(fn, donate_argnames=("state",))
