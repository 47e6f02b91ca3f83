"""Uni-RoPE: rotary position embedding over the (t, h, w) position of each token.

Each head's head_dim // 2 rotary frequency pairs are shared out between the three axes
(config.model.rope_sections = (n_t, n_h, n_w) pairs): a pair rotates by the token's t, h
or w position (ERNIE 5.0 Uni-RoPE, after Qwen2-VL's multimodal RoPE, arXiv 2409.12191
Sec. 2.1). The frequency of pair i is theta^(-2i / head_dim) as in 1-D RoPE (Su et al.
2021, arXiv 2104.09864), so text tokens, which have t = h = w = index, get exactly 1-D
RoPE. Each axis's pairs are spread evenly over the frequency range (t h w t t h w t ...
for (8, 4, 4)), not given as consecutive blocks: with blocks, h and w get only the
lowest frequencies (w rotates by <= 0.001 rad per cell at head_dim 32), the cells of one
image scale are nearly indistinguishable, and the model cannot generate images (measured:
generated digits classified 7% correct with blocks, 97% interleaved, tiny.py at 1500
steps). The interleaving follows the same observation as Qwen3-VL's interleaved MRoPE.

Pair i rotates the feature pair (x[i], x[i + head_dim // 2]) ("rotate-half" layout).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def text_positions(batch: int, seq_len: int) -> jax.Array:
  """Returns text positions [batch, seq, 3] int32 with t = h = w = index."""
  index = jnp.arange(seq_len, dtype=jnp.int32)
  return jnp.broadcast_to(index[None, :, None], (batch, seq_len, 3))


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Returns the 1-D RoPE frequencies theta^(-2i / head_dim), [head_dim // 2] float32."""
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def section_index(sections: Sequence[int]) -> np.ndarray:
  """Returns [sum(sections)] int32: which position axis (0=t, 1=h, 2=w) drives each pair.

  Axis a's j-th of n_a pairs sits at fraction (j + 1/2) / n_a of the frequency range; the
  pairs are ordered by that fraction (ties: t, then h, then w).
  """
  if len(sections) != 3 or any(s < 0 for s in sections):
    raise ValueError(f"rope sections={tuple(sections)} are not accepted: expected 3 "
                     "non-negative pair counts (t, h, w)")
  keys = [((j + 0.5) / n, axis) for axis, n in enumerate(sections) for j in range(n)]
  return np.asarray([axis for _, axis in sorted(keys)], np.int32)


def rope_angles(positions: jax.Array, *, head_dim: int, sections: Sequence[int],
                theta: float) -> jax.Array:
  """Returns rotation angles [batch, seq, head_dim // 2] float32 from (t, h, w) positions.

  Args:
    positions: [batch, seq, 3] int32 (t, h, w).
    head_dim: per-head width; sum(sections) must equal head_dim // 2.
    sections: rotary pairs given to t, h and w.
    theta: base frequency.
  """
  if sum(sections) != head_dim // 2:
    raise ValueError(f"rope sections={tuple(sections)} are not accepted: expected a sum "
                     f"of head_dim // 2 = {head_dim // 2}")
  if positions.shape[-1] != 3:
    raise ValueError(f"positions.shape={positions.shape} is not accepted: expected "
                     "[batch, seq, 3] (t, h, w)")
  pair_pos = jnp.take(positions, section_index(sections), axis=-1)  # [B, S, Dh/2]
  return pair_pos.astype(jnp.float32) * inverse_frequencies(head_dim, theta)


def rotation_table(angles: jax.Array) -> jax.Array:
  """[cos | sin] of angles [batch, seq, pairs] -> [batch, seq, 2 * pairs] float32.

  One array, not two: XLA:CPU fuses a lone cos or sin into each consumer and evaluates it
  there per output element, i.e. again for every head and both halves of q and k, forward
  and backward (3% of the small comparison preset's train step: 524 -> 507 ms, same
  process, docs/results.md). The concatenation is computed once and then read.
  """
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by angles [batch, seq, head_dim // 2]."""
  half = x.shape[-1] // 2
  table = rotation_table(angles)[:, :, None, :]  # [B, S, 1, Dh]
  cos, sin = table[..., :half], table[..., half:]  # [B, S, 1, Dh/2] each
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
