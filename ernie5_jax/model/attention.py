"""Grouped-query self-attention with Uni-RoPE (GQA: Ainslie et al. 2023, arXiv 2305.13245)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ernie5_jax.model import rope
from ernie5_jax.model.kv_cache import LayerCache
from ernie5_jax.model.layers import fan_in_init, matmul, param
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
    q = matmul(x, w(self.wq))  # [batch, seq, q_heads, head_dim]
    k = matmul(x, w(self.wk))  # [batch, seq, kv_heads, head_dim]
    v = matmul(x, w(self.wv))  # [batch, seq, kv_heads, head_dim]
    return rope.apply_rope(q, angles), rope.apply_rope(k, angles), v

  def project_out(self, out: jax.Array) -> jax.Array:
    """Per-head outputs [batch, seq, q_heads, head_dim] -> [batch, seq, embed]."""
    return matmul(out, self.wo[...].astype(self.dtype), contract=2)  # [batch, seq, embed]

  def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array, *, cache: LayerCache | None = None
               ) -> tuple[jax.Array, LayerCache | None]:
    """x [batch, T, embed], angles [batch, T, head_dim // 2] -> (out [batch, T, embed], cache).

    Without a cache the T positions attend to each other under the unified-sequence mask of
    segment_ids / group_ids [batch, T] (training, scoring, prefill-free evaluation). With a
    cache (model/kv_cache.py) their keys/values are written at slots index .. index + T - 1
    and the queries attend to all max_len slots under cache.mask (which already encodes
    the segments and groups); the returned cache holds the new entries.
    """
    q, k, v = self.project_qkv(x, angles)
    if cache is None:
      out = attention_ops.attention(q, k, v, segment_ids=segment_ids, group_ids=group_ids,
                                    backend=self.backend)  # [batch, T, q_heads, head_dim]
      return self.project_out(out), None
    start = (0, cache.index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
    # T queries vs max_len slots: the plain masked-softmax path serves every platform (the
    # flash kernel is for the square training case).
    out = attention_ops.xla_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                      cache.mask)
    return self.project_out(out), dataclasses.replace(cache, k=cache_k, v=cache_v)
