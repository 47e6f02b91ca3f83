"""Attention op with backend selection: causal + packing + group-bidirectional masks.

The unified sequence (DESIGN.md) needs one mask kind: position i may attend to j when
both lie in the same packed segment and j is not in i's future, except that tokens of
the same nonzero group (e.g. one vision scale) see each other in both directions:

  allowed(i, j) = seg[i] == seg[j] and (j <= i or (grp[i] == grp[j] and grp[i] != 0))

Backends: "xla" (below: one masked softmax, the CPU path) and "pallas"
(`pallas_kernels.flash_attention`: block-sparse flash attention that skips fully
masked blocks; interpret mode on CPU). "auto" is decided in ops/backend.py.
Under an active layout (sharding.use_layout) the kernel runs inside `jax.shard_map`, one
call per device on its batch rows and heads: Mosaic and Triton kernels cannot be
partitioned by XLA, and attention needs no communication between rows or heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from jax.sharding import PartitionSpec

from ernie5_jax import sharding
from ernie5_jax.ops.backend import pallas_interpret, resolve_attention_backend


def make_mask(segment_ids: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Returns the boolean attention mask [batch, q_seq, kv_seq] of the unified sequence."""
  seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]  # [B, T, 1], [B, 1, S]
  grp_q, grp_k = group_ids[:, :, None], group_ids[:, None, :]
  seq_len = segment_ids.shape[1]
  causal = jnp.arange(seq_len)[None, :, None] >= jnp.arange(seq_len)[None, None, :]  # [1, T, S]
  same_group = (grp_q == grp_k) & (grp_q != 0)
  return (seg_q == seg_k) & (causal | same_group)  # [B, T, S]


def _check_shapes(q, k, v, segment_ids, group_ids) -> None:
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"attention expects q [B, S, H, Dh] and k, v [B, S, KV, Dh]; got "
                     f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}")
  batch, seq, heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
    raise ValueError(f"attention k.shape={k.shape} does not match q.shape={q.shape} "
                     f"(expected [B={batch}, S={seq}, KV, Dh={head_dim}])")
  if heads % k.shape[2]:
    raise ValueError(f"attention kv_heads={k.shape[2]} is not accepted: expected a divisor "
                     f"of q heads={heads}")
  for name, ids in (("segment_ids", segment_ids), ("group_ids", group_ids)):
    if ids.shape != (batch, seq):
      raise ValueError(f"attention {name}.shape={ids.shape} is not accepted: expected "
                       f"[batch, seq]={(batch, seq)}")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention in plain XLA; K/V heads are shared by query groups (GQA).

  Args:
    q: [batch, q_seq, heads, head_dim].
    k, v: [batch, kv_seq, kv_heads, head_dim]; heads = kv_heads * groups, and query
      head h reads kv head h // groups (no repeated K/V is materialised).
    mask: [batch, q_seq, kv_seq] bool; every query row must allow at least one key.

  Returns:
    [batch, q_seq, heads, head_dim] in q's dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)  # [B, T, K, G, D]
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k,
                      preferred_element_type=jnp.float32)  # [B, K, G, T, S]
  logits = logits * (head_dim ** -0.5)
  # A finite floor (not -inf) keeps gradients NaN-free even for masked entries.
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v.dtype), v)  # [B, T, K, G, D]
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
              group_ids: jax.Array, backend: str = "auto") -> jax.Array:
  """Grouped-query attention under the unified-sequence mask (see module docstring).

  Args:
    q: [batch, seq, heads, head_dim].
    k, v: [batch, seq, kv_heads, head_dim], heads % kv_heads == 0.
    segment_ids: [batch, seq] int32 packing segments.
    group_ids: [batch, seq] int32; 0 = no group (causal), nonzero = bidirectional group.
    backend: one of config.ATTENTION_BACKENDS; "auto" picks the best for the platform.

  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  """
  _check_shapes(q, k, v, segment_ids, group_ids)
  if resolve_attention_backend(backend) == "pallas":
    kernel = functools.partial(pallas_kernels.flash_attention, interpret=pallas_interpret())
    layout = sharding.active_layout()
    if layout is None:
      return kernel(q, k, v, segment_ids, group_ids)
    return _per_device(kernel, layout, q, k, v, segment_ids, group_ids)
  return xla_attention(q, k, v, make_mask(segment_ids, group_ids))


def _per_device(kernel, layout: sharding.Layout, q, k, v, segment_ids, group_ids) -> jax.Array:
  """kernel(q, k, v, segment_ids, group_ids) in a shard_map over batch rows and heads.

  Rows split over the 'batch' rule's mesh axes and heads over the 'q_heads' ones, where
  they divide (else that dimension is whole on every device: gathered first). K/V heads
  split like the query heads: query head h of a device reads its kv head h // groups.
  check_vma=False, as in ops/moe_expert_parallel.py: the Pallas interpreter (CPU) does not
  track varying mesh axes.
  """
  batch, _, heads, _ = q.shape
  rows = layout.dividing_axes(sharding.BATCH, batch)
  head_axes = tuple(a for a in layout.axes("q_heads") if a not in rows)
  if (head_axes != tuple(a for a in layout.axes("kv_heads") if a not in rows)
      or heads % layout.size(head_axes) or k.shape[2] % layout.size(head_axes)):
    head_axes = ()
  row_spec, head_spec = rows or None, head_axes or None
  qkv = PartitionSpec(row_spec, None, head_spec, None)  # [batch, seq, heads, head_dim]
  ids = PartitionSpec(row_spec, None)  # [batch, seq]
  return jax.shard_map(kernel, mesh=layout.mesh, in_specs=(qkv, qkv, qkv, ids, ids),
                       out_specs=qkv, check_vma=False)(q, k, v, segment_ids, group_ids)
