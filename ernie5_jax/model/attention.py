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

  def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array) -> jax.Array:
    """x [batch, seq, embed], angles [batch, seq, head_dim // 2] -> [batch, seq, embed]."""
    x = x.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum("BSD,DHK->BSHK", x, w(self.wq))  # [batch, seq, q_heads, head_dim]
    k = jnp.einsum("BSD,DHK->BSHK", x, w(self.wk))  # [batch, seq, kv_heads, head_dim]
    v = jnp.einsum("BSD,DHK->BSHK", x, w(self.wv))  # [batch, seq, kv_heads, head_dim]
    q = rope.apply_rope(q, angles)
    k = rope.apply_rope(k, angles)
    out = attention_ops.attention(q, k, v, segment_ids=segment_ids, group_ids=group_ids,
                                  backend=self.backend)  # [batch, seq, q_heads, head_dim]
    return jnp.einsum("BSHK,HKD->BSD", out, w(self.wo))
