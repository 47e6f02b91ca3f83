"""Sub-model export: one member of the elastic family as a standalone, smaller Decoder.

The one home of export (`python -m ernie5_jax.main --mode=export`; the eval and
generation tools call `export_submodel` in memory). A SubModel (model/elastic.py)
becomes a normal model of its own config (`elastic.sub_config`):
- depth: the kept layers (`elastic.kept_layers`) are restacked, so the dense and MoE
  stacks hold only those (scanned stacks: a gather on the 'layers' axis; unscanned:
  renumbered blocks);
- width: every MoE layer keeps the expert prefix 0..experts-1: w_gate / w_up / w_down,
  the router kernel's columns and the router bias are sliced. Under elastic.scheme "paper"
  (random expert subsets in training) `expert_order` first ranks each layer's experts by
  measured load and `permute_experts` reorders router columns, bias and expert weights
  together (the full model computes the same function), so the prefix is the experts of
  highest load;
- sparsity: model.top_k = sub.top_k.
Router bias: a sub-model of reduced width or top-k selected without the bias in training
(model/router.py), so its export carries a zero bias.
Everything else (embedding, norms, shared experts, MTP and audio heads, the loss EMA) is
copied. The export computes exactly what the full model computes under
`elastic.masks_for(config, sub)`: masked experts had -inf logits, so softmax / sigmoid
over the kept prefix are the same numbers.

On disk (`write_submodel`), <dir>/ holds
  model/          orbax StandardCheckpointer save of the nnx.State (params + RouterBias, ...)
  config.json     the sub-model's full experiment config (store.save_config)
  submodel.json   {"depth", "experts", "top_k", "kept_layers", "source"}
the layout `ernie5_jax.train.store.restore_model(dir)` loads as a normal Decoder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ernie5_jax import input_pipeline
from ernie5_jax import store
from ernie5_jax.model import elastic
from ernie5_jax.model.decoder import Decoder

_STACKS = ("dense_layers", "moe_layers")
_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # [(layers,) experts, ...]


def abstract_model(config: ml_collections.ConfigDict) -> Decoder:
  """The Decoder of config with jax.ShapeDtypeStruct leaves (nothing is computed)."""
  return nnx.eval_shape(lambda: Decoder(config.model, mtp_depth=config.objective.mtp_depth,
                                        rngs=nnx.Rngs(0)))


def param_counts(config: ml_collections.ConfigDict, sub: elastic.SubModel) -> dict[str, int]:
  """Parameters of `sub` exported: total (every array, MTP/audio heads included) and active
  per token (total minus the routed experts a token does not use)."""
  cfg = elastic.sub_config(config, sub)
  total = sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
  m = cfg.model
  per_expert = 3 * m.d_model * m.expert_hidden  # w_gate, w_up, w_down
  moe_layers = m.num_layers - m.num_dense_layers
  inactive = moe_layers * (m.num_experts - m.top_k) * per_expert
  return {"total": total, "active_per_token": total - inactive}


def _value(leaf: Any) -> jax.Array:
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _source(path: tuple, value_of, config: ml_collections.ConfigDict, sub: elastic.SubModel,
            kept: tuple[int, ...]) -> jax.Array:
  """The array of the sub-model's variable at `path`, cut from the full model's state."""
  if not (path and path[0] in _STACKS and len(path) > 1 and path[1] == "layers"):
    return value_of(path)
  num_dense = config.model.num_dense_layers
  local = ([i for i in kept if i < num_dense] if path[0] == "dense_layers" else
           [i - num_dense for i in kept if i >= num_dense])  # Kept indices in this stack.
  scanned = bool(config.model.scan_layers)
  if scanned:
    array = jnp.take(value_of(path), jnp.asarray(local, jnp.int32), axis=0)
  else:  # ('moe_layers', 'layers', j, ...): block j of the sub-model is block local[j].
    array = value_of(path[:2] + (local[path[2]],) + path[3:])
  if path[0] == "moe_layers":
    lead = 1 if scanned else 0  # The stacked 'layers' axis.
    if path[-2:-1] == ("experts",) and path[-1] in _EXPERT_WEIGHTS:
      array = jax.lax.slice_in_dim(array, 0, sub.experts, axis=lead)
    elif path[-2:] in (("router", "kernel"), ("router", "bias")):
      array = array[..., :sub.experts]  # kernel [.., embed, experts]; bias [.., experts]
      full = elastic.full_submodel(config)
      if path[-1] == "bias" and (sub.experts, sub.top_k) != (full.experts, full.top_k):
        array = jnp.zeros_like(array)  # Reduced routing selects without the bias.
  return array


def measure_load(model: Decoder, batches: list[dict[str, Any]]) -> jax.Array:
  """[moe_layers, experts] assignments of the full model summed over batches."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def load(state, batch):
    m = nnx.merge(graphdef, state)
    _, aux = m.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                             batch["group_ids"], batch.get("audio_codes"))
    return aux["expert_load"]  # [moe_layers, experts]
  return sum(load(state, b) for b in batches)


def expert_order(load: jax.Array) -> jax.Array:
  """[moe_layers, experts] int32: each layer's experts by measured load, highest first."""
  return jnp.argsort(-jnp.asarray(load), axis=-1, stable=True).astype(jnp.int32)


def permute_experts(config: ml_collections.ConfigDict, model_state: nnx.State,
                    order: jax.Array) -> nnx.State:
  """model_state with MoE layer l's expert e moved to slot order[l].index(e): router kernel
  columns, router bias and expert weights permuted together (the same function).

  order: [moe_layers, experts], e.g. expert_order(measure_load(...)).
  """
  moe_layers = config.model.num_layers - config.model.num_dense_layers
  order = jnp.asarray(order, jnp.int32)
  if order.shape != (moe_layers, config.model.num_experts):
    raise ValueError(f"order.shape={order.shape} is not accepted: expected "
                     f"{(moe_layers, config.model.num_experts)} (moe_layers, experts)")
  scanned = bool(config.model.scan_layers)
  leaves = []
  for path, leaf in nnx.to_flat_state(model_state):
    value = _value(leaf)
    is_expert = path[-2:-1] == ("experts",) and path[-1] in _EXPERT_WEIGHTS
    is_router = path[-2:] in (("router", "kernel"), ("router", "bias"))
    if path[:2] == ("moe_layers", "layers") and (is_expert or is_router):
      axis = value.ndim - 1 if is_router else (1 if scanned else 0)
      if scanned:  # [layers, ...]: each layer its own order.
        value = jax.vmap(lambda v, o: jnp.take(v, o, axis=axis - 1))(value, order)
      else:  # ('moe_layers', 'layers', i, ...)
        value = jnp.take(value, order[path[2]], axis=axis)
    leaves.append((path, leaf.replace(value) if isinstance(leaf, nnx.Variable) else value))
  return nnx.from_flat_state(leaves)


def export_submodel(config: ml_collections.ConfigDict, model_state: nnx.State,
                    sub: elastic.SubModel, *, order: jax.Array | None = None
                    ) -> tuple[ml_collections.ConfigDict, nnx.State]:
  """The standalone (sub_config, sub_state) of `sub` from the full model's state.

  model_state: nnx.state(model) of config's Decoder (e.g. TrainState.model_state()).
  order: optional [moe_layers, experts] expert order (permute_experts; scheme "paper"):
  the sub-model keeps the first sub.experts of each layer's order.
  sub_state fits Decoder(sub_config.model, mtp_depth=sub_config.objective.mtp_depth):
  nnx.merge(nnx.graphdef(abstract_model(sub_config)), sub_state) is the sub-model.
  """
  elastic.check_submodel(config, sub)
  kept = elastic.kept_layers(config, sub)
  sub_cfg = elastic.sub_config(config, sub)
  if order is not None:
    model_state = permute_experts(config, model_state, order)
  full = dict(nnx.to_flat_state(model_state))

  def value_of(path: tuple) -> jax.Array:
    if path not in full:
      raise ValueError(f"model_state has no variable {'/'.join(map(str, path))}: expected "
                       "nnx.state of the Decoder built from `config`")
    return _value(full[path])

  leaves = []
  for path, target in nnx.to_flat_state(nnx.state(abstract_model(sub_cfg))):
    array = _source(path, value_of, config, sub, kept)
    if array.shape != target.shape:
      raise ValueError(f"model_state variable {'/'.join(map(str, path))} has shape "
                       f"{array.shape}; the sub-model {sub} expects {target.shape}: is "
                       "model_state the state of the Decoder built from `config`?")
    leaves.append((path, target.replace(array.astype(target.dtype))))
  return sub_cfg, nnx.from_flat_state(leaves)


def build_model(config: ml_collections.ConfigDict, model_state: nnx.State) -> Decoder:
  """The Decoder of config holding model_state (e.g. an exported sub-model)."""
  return nnx.merge(nnx.graphdef(abstract_model(config)), model_state)


def write_submodel(directory: str, sub_config: ml_collections.ConfigDict,
                   sub_state: nnx.State, *, sub: elastic.SubModel | None = None,
                   source: str = "", kept_layers: tuple[int, ...] = ()) -> str:
  """Writes an exported sub-model to directory/ (module docstring); returns the directory."""
  directory = store.save_model(directory, sub_config, sub_state)
  m = sub_config.model
  sub = sub or elastic.SubModel(m.num_layers, m.num_experts, m.top_k)
  with open(os.path.join(directory, "submodel.json"), "w") as f:
    json.dump({"depth": sub.depth, "experts": sub.experts, "top_k": sub.top_k,
               "kept_layers": list(kept_layers), "source": source}, f, indent=2)
  return directory


def export_checkpoint(path: str, sub: elastic.SubModel, out_dir: str, *,
                      config: ml_collections.ConfigDict | None = None,
                      step: int | None = None) -> str:
  """Exports `sub` of a checkpoint to out_dir; returns out_dir.

  path: anything store.restore_model accepts (a workdir: its latest step, or `step`);
  config: the run's config (default: the config.json stored with the checkpoint).
  Raises store.CheckpointNotFoundError when path holds no checkpoint, ConfigError
  when `sub` is not a member of the model's family.
  """
  location = store.locate(path, step)
  if config is not None:  # Fail on a bad SubModel before restoring anything.
    elastic.check_submodel(config, sub)
  config, model = store.restore_model(location, config=config)
  elastic.check_submodel(config, sub)
  order = None
  if config.elastic.scheme == "paper":  # Keep the experts of highest load (module docstring).
    data = input_pipeline.create_train_iterator(config)
    order = expert_order(measure_load(model, [next(data) for _ in range(
        config.eval.num_batches)]))
  sub_config, sub_state = export_submodel(config, nnx.state(model), sub, order=order)
  source = str(location.model_dir) + ("" if location.step is None else f" (step {location.step})")
  return write_submodel(out_dir, sub_config, sub_state, sub=sub, source=source,
                        kept_layers=elastic.kept_layers(config, sub))
