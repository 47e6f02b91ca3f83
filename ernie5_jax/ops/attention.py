"""Attention op with backend selection: causal + packing + group-bidirectional masks.

The unified sequence (DESIGN.md) needs one mask kind: position i may attend to j when
both lie in the same packed segment and j is not in i's future, except that tokens of
the same nonzero group (e.g. one vision scale) see each other in both directions:

  allowed(i, j) = seg[i] == seg[j] and (j <= i or (grp[i] == grp[j] and grp[i] != 0))

Backends: "xla" (below: one masked softmax with a hand-written backward, the CPU path) and "pallas"
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

  One custom VJP, laid out for XLA's CPU backend (the training path there): the query
  heads of one kv head are stacked into the rows of one score matrix, so every dot is a
  plain batched matmul over (batch, kv head); the output is normalised after the value
  product ([q_seq, head_dim] divisions, not [q_seq, kv_seq]), and the backward uses the
  saved unnormalised probabilities (as flash attention's backward does with recomputed
  ones). Self-attention runs in query blocks of QUERY_BLOCK rows. Block i's keys split at
  its end e_i = (i + 1) * QUERY_BLOCK: when the mask lets no row see a key >= e_i (causal
  text; bidirectional groups that do not cross a block end), the keys past e_i are skipped
  ((n - 1) / 2n of the scores at n blocks); otherwise (a lax.cond on the mask) they are computed
  too, and the backward recomputes their probabilities from the saved row maxima. Both
  branches save the same residuals, so neither zero-fills the other's.
  """
  return _attention(_query_blocks(q.shape[1], k.shape[1]), q, k, v, mask)


# Rows of one query block of the blocked self-attention path. 64 rather than 128: more of
# the causal scores are skipped (7/16 instead of 3/8 at seq 512) and the dots stay large
# enough; same process, alternating rounds, the train step of both comparison presets
# was 4% faster (small 521 -> 499 ms, medium 3,071 -> 2,953 ms; 32 rows: slower compiles,
# less gain). Sequences shorter than MIN_QUERY_BLOCKS blocks run as one block, so the
# short sequences of tests and the tiny config compile as few ops as before.
QUERY_BLOCK = 64
MIN_QUERY_BLOCKS = 4


def _query_blocks(q_len: int, kv_len: int) -> int:
  """Query blocks of the blocked path: 1 (off) unless self-attention of >= MIN_QUERY_BLOCKS
  whole blocks."""
  if q_len != kv_len or q_len % QUERY_BLOCK or q_len < MIN_QUERY_BLOCKS * QUERY_BLOCK:
    return 1
  return q_len // QUERY_BLOCK


def _within_blocks(mask: jax.Array, blocks: int) -> jax.Array:
  """[] bool: no query of block i may attend to a key at or past block i's end."""
  batch, length, _ = mask.shape
  size = length // blocks
  rows = mask.reshape(batch, blocks, size, length)  # [B, blocks, rows, S]
  ends = (jnp.arange(blocks)[:, None] + 1) * size  # [blocks, 1]
  beyond = jnp.arange(length)[None, :] >= ends  # [blocks, S]
  return ~jnp.any(rows & beyond[None, :, None, :])


def _stack_heads(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] -> [B, KV, G, T, D]: query head h = kv * G + g."""
  batch, length, heads, head_dim = x.shape
  x = x.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  return x.transpose(0, 2, 3, 1, 4)


def _unstack_heads(x: jax.Array) -> jax.Array:
  """_stack_heads' inverse: [B, KV, G, T, D] -> [B, T, H, D]."""
  batch, kv_heads, groups, length, head_dim = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * groups, head_dim)


def _rows(x: jax.Array, start: int, stop: int) -> jax.Array:
  """[B, KV, G, T, D] -> rows start..stop of every query head, stacked: [B, KV, G*n, D]."""
  x = x[:, :, :, start:stop]
  return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _spans(length: int, blocks: int):
  """(query start, query stop, own keys, later keys or None) of each block: a block's own
  keys end where its queries do; one block (e.g. a KV-cache step) owns every key."""
  if blocks == 1:
    return [(0, length, slice(None), None)]
  size = length // blocks
  return [(i * size, (i + 1) * size, slice(None, (i + 1) * size),
           slice((i + 1) * size, None) if i + 1 < blocks else None) for i in range(blocks)]


def _scores(qb, keys, mask, groups):
  """Scaled scores [B, KV, G*n, s] of stacked query rows qb against keys [B, KV, s, D]; rows
  of mask [B, n, s] that are False hold a finite floor (exp() of it underflows to 0)."""
  logits = jnp.einsum("bkqd,bksd->bkqs", qb, keys,
                      preferred_element_type=jnp.float32) * (qb.shape[-1] ** -0.5)
  batch, kv_heads, rows, width = logits.shape
  grouped = logits.reshape(batch, kv_heads, groups, rows // groups, width)
  grouped = jnp.where(mask[:, None, None], grouped, jnp.finfo(jnp.float32).min)
  return grouped.reshape(logits.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(blocks, q, k, v, mask):
  return _attention_fwd(blocks, q, k, v, mask)[0]


def _attention_fwd(blocks, q, k, v, mask):
  kv_heads = k.shape[2]
  qh = _stack_heads(q, kv_heads)  # [B, KV, G, T, D]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
  fits = jnp.asarray(True) if blocks == 1 else _within_blocks(mask, blocks)
  out, saved = _by_mask(_blocks_fwd, blocks, fits, qh, kh, vh, mask)
  return (_unstack_heads(out).astype(q.dtype),
          (qh, kh, vh, mask, fits, out) + saved)


def _by_mask(fn, blocks: int, fits, *args):
  """fn(beyond, blocks, *args): beyond=False where every block fits its own keys (always
  with one block), else chosen at run time by fits."""
  if blocks == 1:
    return fn(False, 1, *args)
  return jax.lax.cond(fits, functools.partial(fn, False, blocks),
                      functools.partial(fn, True, blocks), *args)


def _key_parts(beyond: bool, keys: slice, later_keys: slice | None) -> list[slice]:
  """A block's key ranges: its own keys, and the later ones where they are computed."""
  return [keys] if not beyond or later_keys is None else [keys, later_keys]


def _blocks_fwd(beyond: bool, blocks: int, qh, kh, vh, mask):
  """out [B, KV, G, T, D] f32 and (p_own, row max, norm) per block; beyond: also the keys
  past each block's end (their probabilities are not kept)."""
  batch, kv_heads, groups, length, head_dim = qh.shape
  outs, probs, maxima, norms = [], [], [], []
  for start, stop, keys, later_keys in _spans(length, blocks):
    qb = _rows(qh, start, stop)  # [B, KV, G*n, D]
    parts = _key_parts(beyond, keys, later_keys)
    scores = [_scores(qb, kh[:, :, part], mask[:, start:stop, part], groups)
              for part in parts]  # [B, KV, G*n, keys of the part] each
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True)
                                         for x in scores])  # [B, KV, G*n, 1]
    ps = [jnp.exp(x - top) for x in scores]  # unnormalised
    norm = sum(jnp.sum(p, axis=-1, keepdims=True) for p in ps)
    out = sum(jnp.einsum("bkqs,bksd->bkqd", p.astype(vh.dtype), vh[:, :, part],
                         preferred_element_type=jnp.float32)
              for p, part in zip(ps, parts))  # [B, KV, G*n, D]
    outs.append((out / norm).reshape(batch, kv_heads, groups, stop - start, head_dim))
    probs.append(ps[0])
    maxima.append(top)
    norms.append(norm)
  out = jnp.concatenate(outs, axis=3) if blocks > 1 else outs[0]  # [B, KV, G, T, D]
  return out, (tuple(probs), tuple(maxima), tuple(norms))


def _attention_bwd(blocks, saved, d_out):
  qh, kh, vh, mask, fits, out, probs, maxima, norms = saved
  d_oh = _stack_heads(d_out, kh.shape[1]).astype(jnp.float32)  # [B, KV, G, T, D]
  d_q, d_k, d_v = _by_mask(_blocks_bwd, blocks, fits, qh, kh, vh, mask, out, probs, maxima,
                           norms, d_oh)
  return (_unstack_heads(d_q).astype(qh.dtype), d_k.transpose(0, 2, 1, 3).astype(kh.dtype),
          d_v.transpose(0, 2, 1, 3).astype(vh.dtype), None)


def _blocks_bwd(beyond: bool, blocks: int, qh, kh, vh, mask, out, probs, maxima, norms, d_oh):
  """(d_q [B, KV, G, T, D], d_k, d_v [B, KV, S, D]) of _blocks_fwd, f32."""
  f32 = lambda x: x.astype(jnp.float32)
  batch, kv_heads, groups, length, head_dim = qh.shape
  scale = head_dim ** -0.5
  d_qs = []
  d_k, d_v = jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
  for (start, stop, keys, later_keys), p, top, norm in zip(_spans(length, blocks), probs,
                                                           maxima, norms):
    qb, d_ob, ob = _rows(qh, start, stop), _rows(d_oh, start, stop), _rows(out, start, stop)
    # Softmax backward: p * (dp - sum(dp * p)), where sum(dp * p) = sum(d_out * out) per row.
    row = jnp.sum(d_ob * ob, axis=-1, keepdims=True)  # [B, KV, G*n, 1]
    own, *later = _key_parts(beyond, keys, later_keys)
    parts = [(own, p)] + [  # the later keys' probabilities, recomputed from the row maxima
        (part, jnp.exp(_scores(qb, kh[:, :, part], mask[:, start:stop, part], groups) - top))
        for part in later]
    d_qb = 0.0
    for part, pk in parts:
      d_v = d_v.at[:, :, part].add(jnp.einsum("bkqs,bkqd->bksd", pk, d_ob / norm))
      d_p = jnp.einsum("bkqd,bksd->bkqs", d_ob, f32(vh[:, :, part]))  # d loss / d normalised p
      d_logits = (pk / norm) * (d_p - row)
      d_qb = d_qb + jnp.einsum("bkqs,bksd->bkqd", d_logits, f32(kh[:, :, part])) * scale
      d_k = d_k.at[:, :, part].add(jnp.einsum("bkqs,bkqd->bksd", d_logits, f32(qb)) * scale)
    d_qs.append(d_qb.reshape(batch, kv_heads, groups, stop - start, head_dim))
  d_q = jnp.concatenate(d_qs, axis=3) if blocks > 1 else d_qs[0]
  return d_q, d_k, d_v


_attention.defvjp(_attention_fwd, _attention_bwd)


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
