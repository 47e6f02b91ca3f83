"""MoE expert dispatch: y[t] = sum_k w[t, k] * SwiGLU_{e[t, k]}(x[t]).

PLACEHOLDER written by the lead so the model can be built; the dispatch helper
replaces this file with the real backends (gather / ragged_dot / capacity).
"""

import jax
import jax.numpy as jnp


def expert_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *,
               backend: str = "auto", capacity_factor: float = 1.25):
  """Dropless routed SwiGLU experts. x: [T, D]; expert_ids, combine_weights: [T, K]."""
  del backend, capacity_factor
  num_tokens, top_k = expert_ids.shape
  flat = expert_ids.reshape(-1)  # [T*K]
  order = jnp.argsort(flat, stable=True)
  token_of = order // top_k
  xs = x[token_of]  # [T*K, D]
  sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
  ys = jax.lax.ragged_dot(h, w_down, sizes)  # [T*K, D]
  y = jnp.zeros((num_tokens * top_k, x.shape[-1]), ys.dtype).at[order].set(ys)
  y = y.reshape(num_tokens, top_k, -1)
  return jnp.einsum("tkd,tk->td", y, combine_weights.astype(y.dtype)).astype(x.dtype)
