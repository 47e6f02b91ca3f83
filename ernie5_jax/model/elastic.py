"""Elastic sub-models: their specs, layer / expert choice, per-step sampling and masks.

ERNIE 5.0 (arXiv 2602.04705) trains, in one pre-training run, a family of sub-models of
one MoE decoder along three axes (config.elastic.scheme says which layers / experts):
- depth: a SubModel keeps `depth` of the model.num_layers layers (dense ones included);
  a skipped layer is the identity; the first and the last layer are always kept.
  "prefix": the kept layers are canonical (`kept_layers`): the L - depth dropped layers
  are spread evenly over the interior ones, drop i (0-based, of m) at interior position
  floor((i + 1/2) * n / m), n = L - 2 interior layers. "paper": each draw drops L - depth
  interior layers at random (ERNIE's code); export keeps the canonical ones.
- width: a SubModel keeps `experts` routed experts of every MoE layer; the others get -inf
  router logits (softmax / sigmoid give them nothing, top-k never selects them).
  "prefix": experts 0..experts-1. "paper": a random subset, experts / S on each of the
  S = mesh.expert expert shards (the report's multiples of the expert-parallel size);
  export keeps the experts of highest measured load (elastic_export.expert_order).
- sparsity: top_k experts per token, at most model.top_k.
Router bias (ERNIE's elastic MoE layer): a pass selects on score + bias, and its expert
usage moves the bias, only at full width and full top-k (router.py, train/step.py); a
reduced pass selects on the scores alone, so a sub-model's skewed load never steers the
full model's balance.

Training draws the sub-models in-jit (`sample_masks`) as traced `ElasticMasks`, never the
full model (pass 0 trains it): each axis is reduced with probability q = 1 - full_*_prob
(0 without choices), independently, conditioned on at least one axis being reduced; so
P(axis a reduced) = q_a / (1 - prod_b (1 - q_b)) (defaults: depth 0.48, experts and top-k
0.385 each) and the reduced value is uniform over that axis's choices. One compiled step
serves every sub-model: the decoder skips layers with `lax.cond` and picks the top-k with
`lax.switch` over the static set `top_k_choices(config)`. `family` lists the sub-models the
eval and export tools report.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ernie5_jax.config import ConfigError


@dataclasses.dataclass(frozen=True, order=True)
class SubModel:
  """One member of the elastic family: layers kept, routed experts kept, experts per token."""
  depth: int  # Decoder layers kept, dense ones included (kept_layers says which).
  experts: int  # Routed experts kept per MoE layer (scheme: which ones).
  top_k: int  # Experts per token, <= model.top_k.

  def __str__(self) -> str:
    return f"depth={self.depth},experts={self.experts},top_k={self.top_k}"

  @classmethod
  def parse(cls, text: str) -> SubModel:
    """Parses "depth,experts,top_k" (e.g. "2,4,1"), the form `--submodel` takes."""
    parts = text.replace(" ", "").split(",")
    try:
      depth, experts, top_k = (int(p) for p in parts)
    except ValueError:
      raise ConfigError(f"submodel={text!r} is not accepted: expected three ints "
                        "'depth,experts,top_k', e.g. '2,4,1'") from None
    return cls(depth, experts, top_k)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ElasticMasks:
  """A sub-model as traced arrays (one compiled program serves every sub-model).

  top_ks is static metadata (part of the tree structure): the allowed top-k values,
  ascending, with model.top_k last; top_k_index selects one of them.
  """
  layer_keep: jax.Array  # [num_layers] bool: layer i runs (False: identity).
  expert_mask: jax.Array  # [num_experts] bool: routed expert e may be selected.
  top_k_index: jax.Array  # [] int32 index into top_ks.
  top_ks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())

  @property
  def top_k(self) -> jax.Array:
    """[] int32 experts per token."""
    return jnp.asarray(self.top_ks, jnp.int32)[self.top_k_index]


def full_submodel(config: ml_collections.ConfigDict) -> SubModel:
  """The full model as a SubModel."""
  m = config.model
  return SubModel(m.num_layers, m.num_experts, m.top_k)


def min_depth(config: ml_collections.ConfigDict) -> int:
  """Fewest layers a sub-model keeps: the first and the last."""
  return min(2, config.model.num_layers)


def _derived(values, low: int, high: int) -> tuple[int, ...]:
  return tuple(sorted({v for v in values if low <= v <= high}))


def depth_choices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Depths below full that training samples (config.elastic.depths or derived), ascending."""
  L = config.model.num_layers  # pylint: disable=invalid-name
  if config.elastic.depths:
    return tuple(sorted(config.elastic.depths))
  return _derived((round(0.5 * L), round(0.75 * L)), min_depth(config), L - 1)


def expert_choices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Routed-expert counts below full that training samples, ascending."""
  m = config.model
  if config.elastic.expert_counts:
    return tuple(sorted(config.elastic.expert_counts))
  values = (m.num_experts // 2, round(0.75 * m.num_experts))
  if config.elastic.scheme == "paper":  # Multiples of the expert shards.
    shards = expert_shards(config)
    values = (shards * (v // shards) for v in values)
  return _derived(values, max(m.top_k, 1), m.num_experts - 1)


def expert_shards(config: ml_collections.ConfigDict) -> int:
  """S, the expert shards "paper" keeps experts evenly over: mesh.expert (1 if -1)."""
  return max(config.mesh.expert, 1)


def top_k_choices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """All top-k values training uses, ascending, model.top_k last (ElasticMasks.top_ks)."""
  k = config.model.top_k
  derived = ((math.ceil(k / 2), round(0.75 * k)) if config.elastic.scheme == "prefix" else
             range(math.ceil(k / 2), k))  # "paper": k uniform over a range.
  below = (tuple(sorted(config.elastic.top_ks)) if config.elastic.top_ks else
           _derived(derived, 1, k - 1))
  return below + (k,)


def family(config: ml_collections.ConfigDict) -> list[SubModel]:
  """The sub-models eval/export report: full, each sampled axis value alone, the smallest."""
  full = full_submodel(config)
  subs = [full]
  subs += [dataclasses.replace(full, depth=d) for d in reversed(depth_choices(config))]
  subs += [dataclasses.replace(full, experts=e) for e in reversed(expert_choices(config))]
  subs += [dataclasses.replace(full, top_k=k) for k in reversed(top_k_choices(config)[:-1])]
  smallest = SubModel(min((full.depth,) + depth_choices(config)),
                      min((full.experts,) + expert_choices(config)),
                      top_k_choices(config)[0])
  subs.append(smallest)
  return list(dict.fromkeys(subs))  # In order, without repeats.


def check_submodel(config: ml_collections.ConfigDict, sub: SubModel) -> None:
  """Raises ConfigError naming the field of `sub` outside the allowed ranges, and the ranges."""
  m = config.model
  ranges = (f"allowed: depth {min_depth(config)}..{m.num_layers} (model.num_layers; the first "
            f"and last layers are always kept), top_k 1..{m.top_k} (model.top_k), experts "
            f"top_k..{m.num_experts} (model.num_experts)")
  problems = []
  if not min_depth(config) <= sub.depth <= m.num_layers:
    problems.append(f"depth={sub.depth}")
  if not 1 <= sub.top_k <= m.top_k:
    problems.append(f"top_k={sub.top_k}")
  if not max(sub.top_k, 1) <= sub.experts <= m.num_experts:
    problems.append(f"experts={sub.experts}")
  if problems:
    raise ConfigError(f"SubModel({sub}): {', '.join(problems)} is not accepted; {ranges}")


def kept_layers(config: ml_collections.ConfigDict, sub: SubModel) -> tuple[int, ...]:
  """The canonical indices of the layers `sub` keeps (module docstring), ascending."""
  check_submodel(config, sub)
  num_layers = config.model.num_layers
  drop = num_layers - sub.depth
  interior = num_layers - 2
  dropped = {1 + int((i + 0.5) * interior / drop) for i in range(drop)}
  return tuple(i for i in range(num_layers) if i not in dropped)


def sub_config(config: ml_collections.ConfigDict, sub: SubModel) -> ml_collections.ConfigDict:
  """The config of `sub` as a standalone model (fewer layers/experts, its top_k, not elastic)."""
  kept = kept_layers(config, sub)
  out = ml_collections.ConfigDict(config.to_dict())  # A deep, unlocked copy.
  out.model.num_layers = sub.depth
  out.model.num_dense_layers = sum(i < config.model.num_dense_layers for i in kept)
  out.model.num_experts = sub.experts
  out.model.top_k = sub.top_k
  out.elastic.enabled = False
  out.elastic.depths, out.elastic.expert_counts, out.elastic.top_ks = (), (), ()
  return out


def _top_k_index(config: ml_collections.ConfigDict, top_k: int) -> int:
  return top_k_choices(config).index(top_k)


def masks_for(config: ml_collections.ConfigDict, sub: SubModel) -> ElasticMasks:
  """The ElasticMasks of `sub` (concrete arrays); its top_k must be one of top_k_choices."""
  kept = kept_layers(config, sub)
  if sub.top_k not in top_k_choices(config):
    raise ConfigError(f"SubModel({sub}): top_k={sub.top_k} is not accepted for masks: "
                      f"expected one of the trained top-k values {top_k_choices(config)} "
                      "(config.elastic.top_ks + model.top_k); export the sub-model to run "
                      "another top_k")
  m = config.model
  return ElasticMasks(
      layer_keep=jnp.asarray(np.isin(np.arange(m.num_layers), kept)),
      expert_mask=jnp.arange(m.num_experts) < sub.experts,
      top_k_index=jnp.asarray(_top_k_index(config, sub.top_k), jnp.int32),
      top_ks=top_k_choices(config))


def reduce_probs(config: ml_collections.ConfigDict) -> np.ndarray:
  """[8] probabilities of which axes a draw reduces (bit 0 depth, 1 experts, 2 top-k).

  Each axis is reduced with q = 1 - full_*_prob (0 if it has no choices), independently,
  conditioned on some axis being reduced (pattern 0, the full model, has probability 0).
  """
  el = config.elastic
  q = np.array([0.0 if not depth_choices(config) else 1 - el.full_depth_prob,
                0.0 if not expert_choices(config) else 1 - el.full_experts_prob,
                0.0 if len(top_k_choices(config)) < 2 else 1 - el.full_top_k_prob])
  bits = (np.arange(8)[:, None] >> np.arange(3)) & 1  # [patterns, axes]
  weights = np.prod(np.where(bits, q, 1 - q), axis=1)  # [patterns]
  weights[0] = 0.0
  if weights.sum() <= 0:
    raise ConfigError(
        f"config.elastic cannot draw a sub-model other than the full model: depths "
        f"{depth_choices(config)}, expert_counts {expert_choices(config)}, top_ks "
        f"{top_k_choices(config)[:-1]} with full_*_prob {tuple(1 - q)}; expected an axis "
        "with choices and a full_*_prob below 1")
  return weights / weights.sum()


def _random_keep(key: jax.Array, groups: int, size: int, keep_per_group: jax.Array
                 ) -> jax.Array:
  """[groups, size] bool: keep_per_group (traced) random members of each group."""
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (groups, size)), axis=-1), axis=-1)
  return rank < keep_per_group


def sample_masks(config: ml_collections.ConfigDict, key: jax.Array) -> ElasticMasks:
  """Draws one sub-model, never the full model (jit/vmap-able; module docstring)."""
  m = config.model
  k_axes, k_depth, k_experts, k_top_k, k_layers, k_subset = jax.random.split(key, 6)
  pattern = jax.random.choice(k_axes, 8, p=jnp.asarray(reduce_probs(config)))
  reduced = (pattern >> jnp.arange(3)) & 1  # [3]: depth, experts, top-k

  def pick(k, is_reduced: jax.Array, num_choices: int) -> jax.Array:
    """[] int32: uniform in 0..num_choices-1 if is_reduced, else num_choices (= full)."""
    if num_choices == 0:
      return jnp.asarray(num_choices, jnp.int32)
    return jnp.where(is_reduced > 0, jax.random.randint(k, (), 0, num_choices), num_choices)

  depths = depth_choices(config)
  depth = jnp.asarray(depths + (m.num_layers,), jnp.int32)[pick(k_depth, reduced[0],
                                                                len(depths))]
  counts = expert_choices(config)
  experts = jnp.asarray(counts + (m.num_experts,), jnp.int32)[pick(k_experts, reduced[1],
                                                                   len(counts))]
  top_ks = top_k_choices(config)
  top_k_index = pick(k_top_k, reduced[2], len(top_ks) - 1)
  if config.elastic.scheme == "paper":
    interior = max(m.num_layers - 2, 0)
    drop = _random_keep(k_layers, 1, interior, m.num_layers - depth)[0]  # [interior]
    layer_keep = jnp.concatenate([jnp.ones((min(m.num_layers, 2) - 1,), bool), ~drop,
                                  jnp.ones((1,), bool)])[:m.num_layers]
    shards = expert_shards(config)
    expert_mask = _random_keep(k_subset, shards, m.num_experts // shards,
                               experts // shards).reshape(m.num_experts)
  else:
    full = full_submodel(config)
    # Row j: layer_keep of depths[j]; the last row is the full depth.
    table = np.stack([np.isin(np.arange(m.num_layers),
                              kept_layers(config, SubModel(d, full.experts, full.top_k)))
                      for d in depths + (m.num_layers,)])  # [depths + 1, layers]
    layer_keep = jnp.asarray(table)[pick(k_depth, reduced[0], len(depths))]
    expert_mask = jnp.arange(m.num_experts) < experts
  return ElasticMasks(layer_keep=layer_keep, expert_mask=expert_mask,
                      top_k_index=top_k_index, top_ks=top_ks)


def full_routing(masks: ElasticMasks) -> jax.Array:
  """[] bool: masks route at full width and full top-k (router bias used and moved)."""
  return jnp.all(masks.expert_mask, axis=-1) & (masks.top_k_index == len(masks.top_ks) - 1)


def describe(masks: ElasticMasks) -> dict[str, jax.Array]:
  """Scalar sizes of (possibly traced) masks: depth, experts, top_k as float32 (for metrics)."""
  return {"depth": jnp.sum(masks.layer_keep).astype(jnp.float32),
          "experts": jnp.sum(masks.expert_mask).astype(jnp.float32),
          "top_k": masks.top_k.astype(jnp.float32)}
