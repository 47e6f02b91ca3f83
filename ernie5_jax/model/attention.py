"""Grouped-query self-attention with Uni-RoPE (GQA: Ainslie et al. 2023, arXiv 2305.13245)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie5_jax.model import rope
from ernie5_jax.model.layers import fan_in_init, param
from ernie5_jax.ops import attention as attention_ops


class Attention(nnx.Module):
  """Self-attention: q/k/v projections, Uni-RoPE on q and k, masked GQA, out projection."""

  def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype, param_dtype, rngs: nnx.Rngs, backend: str = "auto"):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} is not accepted: expected a divisor "
                       f"of num_heads={num_heads}")
    qkv_init = fan_in_init(0, (1, 2))
    self.wq = param(rngs, qkv_init, (d_model, num_heads, head_dim),
                    ("embed", "q_heads", "head_dim"), param_dtype)
    self.wk = param(rngs, qkv_init, (d_model, num_kv_heads, head_dim),
                    ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wv = param(rngs, qkv_init, (d_model, num_kv_heads, head_dim),
                    ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wo = param(rngs, fan_in_init((0, 1), 2), (num_heads, head_dim, d_model),
                    ("q_heads", "head_dim", "embed"), param_dtype)
    self.dtype = dtype
    self.backend = backend

  def project_qkv(self, x: jax.Array, angles: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [batch, seq, embed] -> q [batch, seq, q_heads, head_dim], k, v [.., kv_heads, ..].

    q and k are rotated by Uni-RoPE angles [batch, seq, head_dim // 2]; v is not.
    """
    x = x.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum("BSD,DHK->BSHK", x, w(self.wq))  # [batch, seq, q_heads, head_dim]
    k = jnp.einsum("BSD,DHK->BSHK", x, w(self.wk))  # [batch, seq, kv_heads, head_dim]
    v = jnp.einsum("BSD,DHK->BSHK", x, w(self.wv))  # [batch, seq, kv_heads, head_dim]
    return rope.apply_rope(q, angles), rope.apply_rope(k, angles), v

  def project_out(self, out: jax.Array) -> jax.Array:
    """Per-head outputs [batch, seq, q_heads, head_dim] -> [batch, seq, embed]."""
    return jnp.einsum("BSHK,HKD->BSD", out, self.wo[...].astype(self.dtype))

  def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array) -> jax.Array:
    """x [batch, seq, embed], angles [batch, seq, head_dim // 2] -> [batch, seq, embed]."""
    q, k, v = self.project_qkv(x, angles)
    out = attention_ops.attention(q, k, v, segment_ids=segment_ids, group_ids=group_ids,
                                  backend=self.backend)  # [batch, seq, q_heads, head_dim]
    return self.project_out(out)

  def decode(self, x: jax.Array, angles: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
             *, index: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new positions through this layer's KV cache (incremental decoding).

    The new keys/values are written at cache slots index .. index + T - 1, then the T
    queries attend to all max_len slots under `mask` (ernie5_jax/generate/cache.py builds
    it from the cache's segment/group bookkeeping: the unified-sequence mask over slots).

    Args:
      x: [batch, T, embed] the new positions (after the block's attention norm).
      angles: [batch, T, head_dim // 2] their Uni-RoPE angles.
      cache_k, cache_v: [batch, max_len, kv_heads, head_dim] this layer's cache.
      index: [] int32 first slot to write; index + T <= max_len (not checked under jit).
      mask: [batch, T, max_len] bool; every row must allow at least one slot.

    Returns:
      (out [batch, T, embed], cache_k, cache_v with the new entries written).
    """
    q, k, v = self.project_qkv(x, angles)
    start = (0, index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
    # Decoding has T != max_len queries vs keys: the plain masked-softmax path serves every
    # platform (the flash kernel is for the square training case).
    out = attention_ops.xla_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask)
    return self.project_out(out), cache_k, cache_v
