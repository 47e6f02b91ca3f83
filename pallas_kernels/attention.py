"""Flash attention with packing and bidirectional groups: entry points, blocks, reference.

  q [B, S, H, D], k / v [B, S, KV, D] (grouped-query heads, H % KV == 0),
  segment_ids / group_ids [B, S] int32, mask rule in `attention_mask`.

`flash_attention_fwd` returns the output and the log-sum-exp the backward
needs; `flash_attention_bwd` returns (dq, dk, dv). `pallas_kernels.ops.
flash_attention` ties them with a custom VJP. Kernel bodies live in
`attention_mosaic.py` (TPU) and `attention_triton.py` (GPU); this module
validates, pads the sequence to the blocks (any length works), and holds the
pure-jnp reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import attention_mask
from pallas_kernels import attention_mosaic
from pallas_kernels import attention_triton
from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query / key block sizes of the forward and backward (dQ and dK/dV) kernels.

  Blocks longer than the sequence shrink to fit it. Outside interpret mode the
  Mosaic body needs key blocks that are multiples of 128 (or the whole padded
  sequence) and the Triton body powers of two >= 16.
  """
  block_q: int = 128
  block_k: int = 128
  block_q_bwd: int | None = None  # None: block_q
  block_k_bwd: int | None = None  # None: block_k

  def __post_init__(self):
    if self.block_q_bwd is None:
      object.__setattr__(self, "block_q_bwd", self.block_q)
    if self.block_k_bwd is None:
      object.__setattr__(self, "block_k_bwd", self.block_k)
    names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    values = {name: getattr(self, name) for name in names}
    for name, value in values.items():
      if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
        raise ValueError(f"BlockSizes.{name}={value!r} must be an int >= 8 and a multiple of 8.")
    largest = max(values.values())
    for name, value in values.items():
      if largest % value:
        raise ValueError(f"BlockSizes.{name}={value} must divide the largest block ({largest}).")


# Defaults when block_sizes=None. TPU: 128 x 128 MXU tiles. GPU: 64-wide tiles
# keep the fp32 accumulators of a D=128 head in registers.
MOSAIC_BLOCK_SIZES = BlockSizes(block_q=128, block_k=128)
TRITON_BLOCK_SIZES = BlockSizes(block_q=64, block_k=64)


def fit_blocks(blocks: BlockSizes, seq_len: int, *, backend: str,
               interpret: bool) -> tuple[BlockSizes, int]:
  """Shrinks blocks to the sequence -> (blocks, padded length), checking backend limits."""
  values = (blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
  if backend == "mosaic":
    # A sequence no longer than the largest block becomes one block (a whole
    # dimension is always a legal Mosaic block).
    whole = common.round_up(seq_len, 8)
    values = tuple(whole for _ in values) if whole <= max(values) else values
  else:
    values = tuple(min(b, common.next_power_of_2(max(seq_len, 16))) for b in values)
  padded = common.round_up(seq_len, max(values))
  fitted = BlockSizes(*values)
  if not interpret:
    for name, value in zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"), values):
      if backend == "mosaic" and name.startswith("block_k") and value % 128 and value != padded:
        raise ValueError(
            f"block_sizes.{name}={value} must be a multiple of 128 (or cover the whole "
            f"padded sequence, {padded}) for the Mosaic (TPU) body.")
      if backend == "triton" and (value < 16 or value & (value - 1)):
        raise ValueError(
            f"block_sizes.{name}={value} must be a power of two >= 16 for the Triton (GPU) body.")
  return fitted, padded


def validate_args(q, k, v, segment_ids, group_ids) -> None:
  """Shape / dtype checks (raise before any Mosaic / Triton lowering)."""
  if q.ndim != 4:
    raise ValueError(
        f"q.shape={tuple(q.shape)} but expected [batch, seq, num_heads, head_dim] (4-D).")
  batch_size, seq_len, num_heads, head_dim = q.shape
  for name, x in (("k", k), ("v", v)):
    if x.ndim != 4 or x.shape[0] != batch_size or x.shape[1] != seq_len or x.shape[3] != head_dim:
      raise ValueError(
          f"{name}.shape={tuple(x.shape)} but expected [batch, seq, num_kv_heads, head_dim] with "
          f"{batch_size=}, {seq_len=}, {head_dim=} (from q.shape={tuple(q.shape)}).")
  if k.shape[2] != v.shape[2]:
    raise ValueError(
        f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must have the same num_kv_heads.")
  num_kv_heads = k.shape[2]
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(
        f"{num_heads=} (q.shape[2]) must be a multiple of {num_kv_heads=} (k.shape[2]).")
  for name, x in (("q", q), ("k", k), ("v", v)):
    common.check_float_dtype(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype} must match.")
  for name, ids in (("segment_ids", segment_ids), ("group_ids", group_ids)):
    if ids is not None:
      common.check_int32(name, ids, (batch_size, seq_len))


def default_ids(q, segment_ids, group_ids):
  """Missing ids become zeros: one segment, no group (plain causal)."""
  zeros = jnp.zeros(q.shape[:2], jnp.int32)
  return (zeros if segment_ids is None else segment_ids,
          zeros if group_ids is None else group_ids)


def _seq_pad(x: jax.Array, padded: int, axis: int = 1, value: float = 0.0) -> jax.Array:
  """Pads `axis` of x to `padded` with `value`."""
  extra = padded - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _head_pad(x: jax.Array, head_dim: int) -> jax.Array:
  """Zero-pads the last (head) axis to `head_dim` (dot products are unchanged)."""
  return common.pad_axis(x, x.ndim - 1, head_dim)


_STATIC = ("scale", "block_sizes", "backend", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention_fwd(
    q: jax.Array,  # [batch, seq, num_heads, head_dim]
    k: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    segment_ids: jax.Array | None = None,  # [batch, seq] int32
    group_ids: jax.Array | None = None,  # [batch, seq] int32
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Forward pass -> (out [B, S, H, D] in q.dtype, lse [B, H, S] float32 log-sum-exp)."""
  common.check_backend(backend)
  validate_args(q, k, v, segment_ids, group_ids)
  seq_len, head_dim = q.shape[1], q.shape[3]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  segment_ids, group_ids = default_ids(q, segment_ids, group_ids)

  def run(body_name, q, k, v, segment_ids, group_ids):
    default = MOSAIC_BLOCK_SIZES if body_name == "mosaic" else TRITON_BLOCK_SIZES
    blocks, padded = fit_blocks(block_sizes or default, seq_len, backend=body_name,
                                interpret=interpret)
    d_pad = head_dim if body_name == "mosaic" else common.next_power_of_2(max(head_dim, 16))
    q_p, k_p, v_p = (_head_pad(_seq_pad(x, padded), d_pad) for x in (q, k, v))
    seg_p, grp_p = attention_mask.pad_ids(segment_ids, group_ids, padded)
    body = attention_mosaic.forward if body_name == "mosaic" else attention_triton.forward
    out, lse = body(q_p, k_p, v_p, seg_p, grp_p, scale=scale, block_q=blocks.block_q,
                    block_k=blocks.block_k, interpret=interpret)
    return out[:, :seq_len, :, :head_dim], lse[:, :, :seq_len]

  return common.dispatch(backend, interpret, functools.partial(run, "mosaic"),
                         functools.partial(run, "triton"), q, k, v, segment_ids, group_ids)


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention_bwd(
    q: jax.Array,  # [batch, seq, num_heads, head_dim]
    k: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    segment_ids: jax.Array | None,  # [batch, seq] int32
    group_ids: jax.Array | None,  # [batch, seq] int32
    out: jax.Array,  # [batch, seq, num_heads, head_dim]
    lse: jax.Array,  # [batch, num_heads, seq] float32
    d_out: jax.Array,  # [batch, seq, num_heads, head_dim]
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Backward pass -> (dq, dk, dv) shaped like q, k, v."""
  common.check_backend(backend)
  validate_args(q, k, v, segment_ids, group_ids)
  seq_len, head_dim = q.shape[1], q.shape[3]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  segment_ids, group_ids = default_ids(q, segment_ids, group_ids)
  # delta_i = sum_d out_id * dout_id = sum_j P_ij dP_ij (FlashAttention-2, Alg. 2).
  delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32))
  d_out = d_out.astype(q.dtype)

  def run(body_name, q, k, v, segment_ids, group_ids, lse, delta, d_out):
    default = MOSAIC_BLOCK_SIZES if body_name == "mosaic" else TRITON_BLOCK_SIZES
    blocks, padded = fit_blocks(block_sizes or default, seq_len, backend=body_name,
                                interpret=interpret)
    d_pad = head_dim if body_name == "mosaic" else common.next_power_of_2(max(head_dim, 16))
    q_p, k_p, v_p, do_p = (_head_pad(_seq_pad(x, padded), d_pad) for x in (q, k, v, d_out))
    seg_p, grp_p = attention_mask.pad_ids(segment_ids, group_ids, padded)
    # Padded query rows get lse = +inf: their probabilities are exactly 0.
    lse_p = _seq_pad(lse, padded, axis=2, value=jnp.inf)
    delta_p = _seq_pad(delta, padded, axis=2)
    body = attention_mosaic.backward if body_name == "mosaic" else attention_triton.backward
    dq, dk, dv = body(q_p, k_p, v_p, seg_p, grp_p, lse_p, delta_p, do_p, scale=scale,
                      block_q=blocks.block_q_bwd, block_k=blocks.block_k_bwd, interpret=interpret)
    return tuple(x[:, :seq_len, :, :head_dim] for x in (dq, dk, dv))

  return common.dispatch(backend, interpret, functools.partial(run, "mosaic"),
                         functools.partial(run, "triton"), q, k, v, segment_ids, group_ids,
                         lse, delta, d_out)


def attention_reference(
    q: jax.Array,  # [batch, seq, num_heads, head_dim]
    k: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    segment_ids: jax.Array | None = None,  # [batch, seq] int32
    group_ids: jax.Array | None = None,  # [batch, seq] int32
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Pure-jnp attention (same signature as ops.flash_attention), float32 softmax, dense mask."""
  del block_sizes, backend, interpret
  validate_args(q, k, v, segment_ids, group_ids)
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  segment_ids, group_ids = default_ids(q, segment_ids, group_ids)
  mask = attention_mask.dense_mask(segment_ids, group_ids)  # [B, S(query), S(key)]
  q5 = q.reshape(batch, seq_len, num_kv, num_heads // num_kv, head_dim)  # head = g * rep + r
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", q5, k, preferred_element_type=jnp.float32,
                      precision=hi) * scale
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v.astype(jnp.float32), precision=hi)
  return out.reshape(q.shape).astype(q.dtype)
