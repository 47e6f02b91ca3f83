"""Fixed-size KV cache of the decoder and the unified-sequence mask over its slots.

Static shapes: the cache holds max_len slots per row for every decoder layer,
  k, v         [layers, batch, max_len, kv_heads, head_dim]
  segment_ids  [batch, max_len] int32   (0 = empty or padding, as in packing)
  group_ids    [batch, max_len] int32   (0 = no group, as in the unified sequence)
  index        [] int32                 slots written so far (the same for every row)
so one compiled step serves every position. Rows of a batch share the slot index;
prompts of different lengths are left-padded with segment 0, and RoPE positions are
passed per token, so a padded row computes exactly what the unpadded one would.

Mask over slots (the training mask of ops/attention.py, with sequence index = slot):
  allowed(i, j) = seg[i] == seg[j] and (slot_j <= slot_i or (grp[i] == grp[j] and grp[i] != 0))
Empty slots have segment 0: real queries (segment >= 1) never see them, and a padding
query sees only earlier padding (slot_j <= slot_i), so no row is fully masked.

The decoder's one forward pass takes the cache (Decoder.hidden_states(..., cache=)): it
writes the new positions' ids, builds the slot mask once, and hands each layer a
`LayerCache` (its k/v, the slot index and the mask) through the layer scan, as the Flax
lm1b and gemma examples thread their cache through attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer plus the segment/group bookkeeping of each slot."""
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  segment_ids: jax.Array  # [batch, max_len] int32
  group_ids: jax.Array  # [batch, max_len] int32
  index: jax.Array  # [] int32: next slot to write

  @property
  def max_len(self) -> int:
    """Slots per row."""
    return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """What one attention layer reads and writes in a cached forward pass."""
  k: jax.Array  # [batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [batch, max_len, kv_heads, head_dim]
  index: jax.Array  # [] int32: the first slot the T new positions are written to
  mask: jax.Array  # [batch, T, max_len] bool: slot_mask of the new positions


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Cache dimensions read off a model (so exported sub-models need no config)."""
  num_layers: int
  kv_heads: int
  head_dim: int
  dtype: jnp.dtype


def stack_layers(stack) -> int:
  """Number of blocks in a decoder BlockStack (stacked params or a list)."""
  if stack is None:
    return 0
  if stack.scan:
    return int(stack.layers.attn.wk.shape[0])  # wk: [layers, embed, kv_heads, head_dim]
  return len(stack.layers)


def _first_attention(model: nnx.Module):
  for stack in (model.dense_layers, model.moe_layers):
    if stack is not None:
      return stack.layers.attn if stack.scan else stack.layers[0].attn
  raise ValueError("model has no decoder layers: expected at least one dense or MoE block")


def cache_spec(model: nnx.Module) -> CacheSpec:
  """Reads layer count, kv heads, head_dim and compute dtype off a Decoder."""
  attn = _first_attention(model)
  kv_heads, head_dim = attn.wk.shape[-2:]
  return CacheSpec(num_layers=stack_layers(model.dense_layers) + stack_layers(
      model.moe_layers), kv_heads=int(kv_heads), head_dim=int(head_dim),
                   dtype=jnp.dtype(attn.dtype))


def init_cache(spec: CacheSpec, *, batch: int, max_len: int) -> KVCache:
  """An empty cache (all slots segment 0) of batch rows x max_len slots."""
  if batch < 1 or max_len < 1:
    raise ValueError(f"batch={batch}, max_len={max_len} are not accepted: expected >= 1")
  shape = (spec.num_layers, batch, max_len, spec.kv_heads, spec.head_dim)
  return KVCache(k=jnp.zeros(shape, spec.dtype), v=jnp.zeros(shape, spec.dtype),
                 segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                 group_ids=jnp.zeros((batch, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


def write_ids(cache: KVCache, segment_ids: jax.Array, group_ids: jax.Array) -> KVCache:
  """Records the segment/group ids [batch, T] of T new slots at cache.index (k/v untouched)."""
  start = (0, cache.index)
  return dataclasses.replace(
      cache, segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start),
      group_ids=jax.lax.dynamic_update_slice(cache.group_ids, group_ids, start))


def slot_mask(cache: KVCache, segment_ids: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Mask [batch, T, max_len] of T new queries (ids [batch, T]) at slots index.. over the cache.

  `cache` must already hold the new slots' ids (write_ids), so that a group sees itself.
  """
  t = segment_ids.shape[1]
  slot_q = cache.index + jnp.arange(t, dtype=jnp.int32)  # [T]
  slot_k = jnp.arange(cache.max_len, dtype=jnp.int32)  # [max_len]
  seg_q, seg_k = segment_ids[:, :, None], cache.segment_ids[:, None, :]  # [B, T, 1], [B, 1, M]
  grp_q, grp_k = group_ids[:, :, None], cache.group_ids[:, None, :]
  causal = slot_k[None, None, :] <= slot_q[None, :, None]  # [1, T, M]
  same_group = (grp_q == grp_k) & (grp_q != 0)
  return (seg_q == seg_k) & (causal | same_group)
