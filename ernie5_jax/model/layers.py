"""Basic layers: parameter helper with logical axis names, RMSNorm, embedding, SwiGLU MLP.

Every parameter carries logical axis names whose entries name its dimensions
(`('embed', 'mlp')`, `('expert', 'embed', 'expert_mlp')`, ...). The names are metadata
only (`out_sharding`, with eager sharding off): no mesh exists when a module is built;
ernie5_jax/sharding.py maps the names to mesh axes through config.mesh.rules
(`tree_shardings`), and parameters are created already sharded by a jitted init.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie5_jax import sharding
from ernie5_jax.config import DTYPES
from ernie5_jax.ops.backend import target_platform


def to_dtype(name: str) -> jnp.dtype:
  """Maps a config dtype name ("float32", "bfloat16") to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"dtype={name!r} is not accepted: expected one of {DTYPES}")
  return jnp.dtype(name)


def fan_in_init(in_axis, out_axis, batch_axis=()) -> jax.nn.initializers.Initializer:
  """N(0, 1 / fan_in) init (LeCun normal) for kernels whose fan-in spans several axes."""
  return jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str],
          dtype) -> nnx.Param:
  """Creates an nnx.Param of `shape` tagged with one logical axis name per dimension."""
  if len(names) != len(shape):
    raise ValueError(f"param names={tuple(names)} do not match shape={tuple(shape)}: "
                     "expected one logical axis name per dimension")
  value = init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., embed]
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` gives the tied output head (logits in float32).

  Gemma-style scaling: the table is N(0, 1/d) so tied logits start at unit scale, and
  looked-up embeddings are multiplied by sqrt(d) so the residual stream starts at unit RMS
  (scale=False: no multiplier, as ERNIE 4.5 checkpoints expect).
  """

  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               scale: bool = True):
    init = jax.nn.initializers.normal(stddev=dim ** -0.5)
    self.table = param(rngs, init, (vocab_size, dim), ("vocab", "embed"), param_dtype)
    self.dtype = dtype
    self.scale = scale

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [batch, seq] -> [batch, seq, embed]
    # Under a mesh the table is gathered whole along embed first (as FSDP gathers any weight
    # before use): a lookup from an embed-split table leaves rows split along embed, which
    # XLA can only turn into batch-split rows by replicating them.
    table = sharding.constrain(self.table[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return x * jnp.asarray(table.shape[1] ** 0.5, self.dtype) if self.scale else x

  def attend(self, x: jax.Array) -> jax.Array:  # [batch, seq, embed] -> [batch, seq, vocab]
    return tied_logits(x, self.table[...].astype(x.dtype))


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [..., embed] @ table [vocab, embed]^T -> float32 logits [..., vocab] (the tied head).

  The custom backward forms the table gradient as (x^T d_logits)^T: autodiff's
  d_logits^T x makes XLA's CPU backend transpose the whole [tokens, vocab] gradient
  first (its largest array), here only the [embed, vocab] result is transposed.
  """
  return jnp.einsum("...D,VD->...V", x, table, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, table):
  return tied_logits(x, table), (x, table)


def _tied_logits_bwd(saved, d_logits):
  x, table = saved
  x2 = x.reshape(-1, x.shape[-1])  # [tokens, embed]
  g2 = d_logits.reshape(-1, d_logits.shape[-1]).astype(x.dtype)  # [tokens, vocab]
  d_x = (g2 @ table).reshape(x.shape)
  d_table = (x2.T @ g2).T  # [vocab, embed]
  return d_x, d_table.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class OutputHead(nnx.Module):
  """Untied output projection to the vocabulary; logits in float32."""

  def __init__(self, dim: int, vocab_size: int, *, param_dtype, rngs: nnx.Rngs):
    self.kernel = param(rngs, fan_in_init(0, 1), (dim, vocab_size), ("embed", "vocab"),
                        param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:  # [batch, seq, embed] -> [batch, seq, vocab]
    return jnp.einsum("BSD,DV->BSV", x, self.kernel[...].astype(x.dtype),
                      preferred_element_type=jnp.float32)


def matmul(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """x [..., C...] @ w [C..., N...] -> [..., N...] as one 2-D [tokens, C] x [C, N] dot.

  contract: how many trailing dims of x (leading dims of w) are contracted. XLA's CPU
  backend runs a dot whose free dims are flattened to one ~1.5-1.9x faster in training
  than the same einsum over [batch, seq, ...]: the batched form's backward transposes
  its [batch * seq, hidden] operands for the weight gradients (benchmarks/train_step.py
  --breakdown); the reshapes here are free. On CPU the dot's weight gradient is a plain
  dot too (`_cpu_dot`).
  """
  lead, inner, out = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
  if x.shape[x.ndim - contract:] != inner:
    raise ValueError(f"matmul shapes {x.shape} x {w.shape} do not match over {contract} dims")
  size = lambda dims: int(np.prod(dims, dtype=np.int64))
  x2, w2 = x.reshape(size(lead), size(inner)), w.reshape(size(inner), size(out))
  y = _cpu_dot(x2, w2) if target_platform() == "cpu" else x2 @ w2
  return y.reshape(*lead, *out)


@jax.custom_vjp
def _cpu_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N], with the weight gradient formed from a stored x^T [K, M].

  Autodiff's weight gradient x^T d_y contracts the token dim M of both operands; XLA's
  CPU backend (jax 0.10.2) runs such a dot outside its YNNPACK dot path, at ~100 GFLOP/s
  in the "small" preset's step against ~200 for a plain one (removing the dense layers'
  weight-gradient dots altogether took 89 ms off a ~520 ms step). Here the forward writes
  x^T once and the backward's dot is a plain [K, M] x [M, N] one; the optimization
  barrier keeps XLA from folding the transpose back into the dot. Same process,
  alternating rounds (benchmarks/presets.py): small 529 -> 514 ms per step, medium
  2,982 -> 2,961 ms (docs/results.md, seventh round); five small A/Bs over two rounds
  average 1.4% faster, within their +-2% spread. On TPU/GPU the transposed operand
  costs nothing: plain autodiff there.
  """
  return x @ w


def _cpu_dot_fwd(x, w):
  return x @ w, (jax.lax.optimization_barrier(x.T), w)  # x^T: [K, M]


def _cpu_dot_bwd(saved, d_y):
  x_t, w = saved
  return d_y @ w.T, x_t @ d_y  # [M, K], [K, N]


_cpu_dot.defvjp(_cpu_dot_fwd, _cpu_dot_bwd)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """SwiGLU feed-forward (Shazeer 2020): (silu(x W_gate) * (x W_up)) W_down; x [..., embed]."""
  hidden = jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)  # [..., mlp]
  return matmul(hidden, w_down)


class MLP(nnx.Module):
  """Dense SwiGLU MLP: the dense first layers and the always-on shared experts."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.w_gate = param(rngs, fan_in_init(0, 1), (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w_up = param(rngs, fan_in_init(0, 1), (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w_down = param(rngs, fan_in_init(0, 1), (hidden, dim), ("mlp", "embed"), param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., embed] -> [..., embed]
    x = x.astype(self.dtype)
    return swiglu(x, self.w_gate[...].astype(self.dtype), self.w_up[...].astype(self.dtype),
                  self.w_down[...].astype(self.dtype))
