"""The jitted train step: the objective (objective.py) + router aux losses, AdamW, router-bias
and loss-EMA updates.

Elastic training (config.elastic.enabled; ERNIE 5.0, arXiv 2602.04705): every step runs
1 + config.elastic.sub_models passes over the same global batch: pass 0 trains the full
model, pass i > 0 a sub-model drawn in-jit by model/elastic.sample_masks from
fold_in(fold_in(key(config.seed), ELASTIC_STREAM), step) and i (so a resumed run draws
the same sub-models). Sharing the batch is the "sandwich rule" of slimmable networks (Yu &
Huang, arXiv 1903.05134): the full model sees every token a non-elastic run sees, and the
sub-models' gradients add to it (an earlier layout that split the batch between them cost
the full model ~1% held-out loss and left top-1 behind the static truncation). A lax.scan
over the passes accumulates the gradients, which are averaged, and one optimizer update
follows. The reported metrics are pass 0's (the full model) plus elastic/* for the
sub-models. The router bias moves only on the load of passes at full width and full top-k
(ERNIE 5.0's elastic MoE rule, elastic.full_routing; pass 0 always, a depth-only
sub-model in the layers it ran), so a sub-model's skewed load never steers the full
model's balance. A sampled sub-model is never the full model (elastic.sample_masks).
Every sub-model shares one compiled step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ernie5_jax.model import elastic as elastic_lib
from ernie5_jax.train import objective
from ernie5_jax.train.state import TrainState

Batch = dict[str, jax.Array]
ELASTIC_STREAM = 0x5E1A  # Folded into key(config.seed): the sub-model draws' own stream.


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


class _SubModelView:
  """The model as objective.compute_loss sees it, running the sub-model `masks`."""

  def __init__(self, model: Any, masks: elastic_lib.ElasticMasks):
    self._model, self._masks = model, masks

  def hidden_states(self, *args, **kwargs):
    """Decoder.hidden_states of the sub-model."""
    return self._model.hidden_states(*args, elastic=self._masks, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._model, name)


def loss_and_metrics(params: nnx.State, rest: nnx.State, batch: Batch, *,
                     graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                     elastic: elastic_lib.ElasticMasks | None = None
                     ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """Returns (total loss, (metrics, aux)) of the objective (objective.py) on one batch.

  elastic: the sub-model to train (model/elastic.py); None: the full model.
  """
  # copy=True: `rest` Variables were created at the outer (jit) trace level.
  model = nnx.merge(graphdef, params, rest, copy=True)
  view = model if elastic is None else _SubModelView(model, elastic)
  loss, (metrics, aux) = objective.compute_loss(view, batch, config=config)
  metrics.update(router_metrics(aux))
  return loss, (metrics, aux)


def step_masks(config: ml_collections.ConfigDict, step: jax.Array) -> elastic_lib.ElasticMasks:
  """The sub-models of one step, stacked [1 + sub_models]: 0 the full model, then draws."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), ELASTIC_STREAM),
                           step)
  draws = jnp.arange(1, 1 + config.elastic.sub_models)
  sampled = jax.vmap(lambda i: elastic_lib.sample_masks(
      config, jax.random.fold_in(key, i)))(draws)  # [sub_models, ...]
  full = elastic_lib.masks_for(config, elastic_lib.full_submodel(config))
  return jax.tree.map(lambda f, s: jnp.concatenate([f[None], s]), full, sampled)


def elastic_grads(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
                   config: ml_collections.ConfigDict):
  """Gradients averaged over the passes (module docstring); metrics of the full model.

  Returns (grads, metrics, aux of pass 0, expert_load [passes, moe_layers, E],
  active [passes, moe_layers, E] bool).
  """
  num = 1 + config.elastic.sub_models
  masks = step_masks(config, state.step)
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

  def body(total, sub):
    (_, (metrics, aux)), grads = grad_fn(state.params, state.rest, batch,
                                         graphdef=graphdef, config=config, elastic=sub)
    return jax.tree.map(jnp.add, total, grads), (metrics, aux)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  total, (metrics, aux) = jax.lax.scan(body, zeros, masks)
  grads = jax.tree.map(lambda g: g / num, total)
  sizes = jax.vmap(elastic_lib.describe)(masks)
  full_metrics = {k: v[0] for k, v in metrics.items()}
  full_metrics["elastic/sub_loss"] = jnp.mean(metrics["loss"][1:])
  full_metrics["elastic/sub_ce_loss"] = jnp.mean(metrics["ce_loss"][1:])
  for name, value in sizes.items():  # Mean size of this step's sampled sub-models.
    full_metrics[f"elastic/{name}"] = jnp.mean(value[1:])
  nd = config.model.num_dense_layers
  full_routing = jax.vmap(elastic_lib.full_routing)(masks)  # [passes]
  active = (masks.layer_keep[:, nd:, None] & full_routing[:, None, None]
            & masks.expert_mask[:, None, :])  # [passes, moe_layers, E]
  return grads, full_metrics, jax.tree.map(lambda v: v[0], aux), aux["expert_load"], active


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch; returns (new state, scalar metrics)."""
  if config.elastic.enabled:
    grads, metrics, aux, load, active = elastic_grads(state, batch, graphdef=graphdef,
                                                       config=config)
  else:
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)  # grads w.r.t. params only
    (_, (metrics, aux)), grads = grad_fn(state.params, state.rest, batch, graphdef=graphdef,
                                         config=config)
    load, active = aux["expert_load"], None
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Aux-loss-free balancing from this step's loads. Inside one jit the model's sum over
  # tokens already spans the global batch, whatever the sharding.
  model = nnx.merge(graphdef, params, state.rest)
  model.update_router_bias(jax.lax.stop_gradient(load), config.router.bias_update_rate, active)
  model.loss_ema[...] = jax.lax.stop_gradient(aux["loss_ema"])  # Posterior weighting's estimate.
  _, _, rest = nnx.split(model, nnx.Param, ...)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)
  # 1.0 iff every new parameter is finite (a finite loss can still lead to inf params): a
  # NaN or inf anywhere makes the norm non-finite, so the norm's pass over the parameters
  # is the check (a separate isfinite pass cost ~1% of a step; overflow of the sum of
  # squares needs |params| ~ 1e19, itself a diverged run).
  metrics["params_finite"] = jnp.isfinite(metrics["param_norm"]).astype(jnp.float32)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    **jit_kwargs: Any) -> Any:
  """Returns train_step jitted with the state donated: fn(state, batch) -> (state, metrics).

  jit_kwargs go to jax.jit, e.g. in/out shardings from sharding.step_shardings.
  """
  fn = functools.partial(train_step, graphdef=graphdef, config=config, tx=tx, schedule=schedule)
  return jax.jit(fn, donate_argnames=("state",), **jit_kwargs)
