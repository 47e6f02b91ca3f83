"""Triton (GPU) bodies of the flash attention kernels: forward, dQ and dK/dV.

FlashAttention-2 (Dao 2023, arXiv 2307.08691). Triton programs are
independent, so each program owns one output block and loops over the other
sequence axis in-kernel: over key blocks for the forward and dQ, over query
blocks (and the query heads sharing the kv head) for dK/dV. Loops cover only
the [lo, hi) range of active blocks (attention_mask.active_range); inside it,
each block's kind (skip / partial / full) picks a branch.

Arrays keep the [B, S, N, D] layout; ids are [B, S]; log-sum-exp and delta
[B, H, S]. Inputs arrive padded: sequence to the blocks, head dim to a power
of two (Triton tensor shapes must be powers of two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import attention_mask
from pallas_kernels import common

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
NUM_STAGES = 2


def _num_warps(block_a: int, block_b: int, head_dim: int) -> int:
  """Warps per program: 8 for large tiles (FA2 Triton tutorial heuristic), else 4."""
  return 8 if block_a * block_b >= 128 * 64 and head_dim > 64 else 4


def _mask(seg_ref, grp_ref, q_block, k_block, bq, bk):
  """[bq, bk] bool: the rule for one block pair, from the program's [S] id rows."""
  q_rows = pl.ds(pl.multiple_of(q_block * bq, bq), bq)
  k_rows = pl.ds(pl.multiple_of(k_block * bk, bk), bk)
  q_pos = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_block * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return attention_mask.allowed(seg_ref[q_rows][:, None], grp_ref[q_rows][:, None], q_pos,
                                seg_ref[k_rows][None, :], grp_ref[k_rows][None, :], k_pos)


def _by_kind(kind, step, carry):
  """Runs step(carry, masked) as the block kind says (skip returns carry unchanged)."""
  return jax.lax.switch(kind, [lambda c: c, lambda c: step(c, True), lambda c: step(c, False)],
                        carry)


def forward(q, k, v, segment_ids, group_ids, *, scale, block_q, block_k, interpret):
  """Padded q [B, S, H, D], k/v [B, S, KV, D], ids [B, S] -> (out [B, S, H, D], lse [B, H, S])."""
  batch, seq, num_heads, head_dim = q.shape
  rep = num_heads // k.shape[2]
  bq, bk = block_q, block_k
  nq, nk = seq // bq, seq // bk
  kinds = attention_mask.block_kinds(segment_ids, group_ids, bq, bk)  # [B, nq, nk]
  lo, hi = attention_mask.active_range(kinds)  # [B, nq]

  def kernel(lo_ref, hi_ref, kinds_ref, q_ref, k_ref, v_ref, seg_ref, grp_ref, o_ref, lse_ref):
    qi = pl.program_id(0)
    q = q_ref[...]  # [bq, D]

    def step(carry, masked: bool, ki):
      acc, m_prev, l_prev = carry
      rows = pl.ds(pl.multiple_of(ki * bk, bk), bk)
      k_blk, v_blk = k_ref[rows, :], v_ref[rows, :]  # [bk, D]
      s = jax.lax.dot_general(q, k_blk, _NT, preferred_element_type=jnp.float32) * scale
      if masked:
        s = jnp.where(_mask(seg_ref, grp_ref, qi, ki, bq, bk), s, common.MASK_VALUE)
      m_next = jnp.maximum(m_prev, s.max(axis=-1))
      p = jnp.exp(s - m_next[:, None])
      correction = jnp.exp(m_prev - m_next)
      l_next = correction * l_prev + p.sum(axis=-1)
      acc = correction[:, None] * acc + jnp.dot(p.astype(v_blk.dtype), v_blk,
                                                preferred_element_type=jnp.float32)
      return acc, m_next, l_next

    def body(ki, carry):
      return _by_kind(kinds_ref[ki], lambda c, masked: step(c, masked, ki), carry)

    init = (jnp.zeros((bq, head_dim), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo_ref[qi], hi_ref[qi], body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)

  itemsize = jnp.dtype(q.dtype).itemsize
  # k / v [B, S, KV, D]: all rows of the query head's kv head (sliced in the loop).
  kv_all = pl.BlockSpec((None, seq, None, head_dim),
                        lambda i, b, h: (b, 0, jax.lax.div(h, rep), 0))
  out, lse = pl.pallas_call(
      kernel,
      out_shape=[common.out_struct(q.shape, q.dtype, q, k, v, segment_ids, group_ids),
                 common.out_struct((batch, num_heads, seq), jnp.float32, q, k, v, segment_ids,
                                   group_ids)],
      grid=(nq, batch, num_heads),
      in_specs=[
          pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),  # lo: the batch row
          pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),  # hi
          pl.BlockSpec((None, None, nk), lambda i, b, h: (b, i, 0)),  # kinds of this query block
          pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),  # q block
          kv_all, kv_all,  # k, v
          pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),  # segment ids row
          pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),  # group ids row
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),  # out block
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),  # lse block
      ],
      compiler_params=pltriton.CompilerParams(
          num_warps=_num_warps(bq, bk, head_dim), num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(
          flops=4 * batch * num_heads * seq * seq * head_dim,
          transcendentals=batch * num_heads * seq * seq,
          bytes_accessed=(q.size * 2 + (k.size + v.size) * rep * nq) * itemsize),
      interpret=interpret,
      name="flash_attention_fwd_triton",
  )(lo, hi, kinds, q, k, v, segment_ids, group_ids)
  return out, lse


def backward(q, k, v, segment_ids, group_ids, lse, delta, do, *, scale, block_q, block_k,
             interpret):
  """Padded inputs (lse, delta [B, H, S] float32; do like q) -> (dq, dk, dv)."""
  batch, seq, num_heads, head_dim = q.shape
  operands = (q, k, v, segment_ids, group_ids, lse, delta, do)  # outputs vary like these
  num_kv = k.shape[2]
  rep = num_heads // num_kv
  bq, bk = block_q, block_k
  nq, nk = seq // bq, seq // bk
  kinds = attention_mask.block_kinds(segment_ids, group_ids, bq, bk)  # [B, nq, nk]
  itemsize = jnp.dtype(q.dtype).itemsize
  num_warps = _num_warps(bq, bk, head_dim)

  def p_and_ds(q, k, v, do, lse, delta, mask):
    """Softmax probabilities and score gradients of one block pair, [bq, bk] f32."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    return p, p * (dp - delta[:, None])

  # --- dQ: one program per (query block, batch, head), loop over key blocks -----
  lo, hi = attention_mask.active_range(kinds)  # [B, nq]

  def dq_kernel(lo_ref, hi_ref, kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                seg_ref, grp_ref, dq_ref):
    qi = pl.program_id(0)
    q, do, lse_q, delta_q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def step(acc, masked: bool, ki):
      rows = pl.ds(pl.multiple_of(ki * bk, bk), bk)
      k_blk, v_blk = k_ref[rows, :], v_ref[rows, :]
      mask = _mask(seg_ref, grp_ref, qi, ki, bq, bk) if masked else None
      _, ds = p_and_ds(q, k_blk, v_blk, do, lse_q, delta_q, mask)
      return acc + jnp.dot(ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)

    def body(ki, acc):
      return _by_kind(kinds_ref[ki], lambda c, masked: step(c, masked, ki), acc)

    acc = jax.lax.fori_loop(lo_ref[qi], hi_ref[qi], body, jnp.zeros((bq, head_dim), jnp.float32))
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)

  q_blk = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))  # this block
  kv_all = pl.BlockSpec((None, seq, None, head_dim),  # all rows of the kv head
                        lambda i, b, h: (b, 0, jax.lax.div(h, rep), 0))
  row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))  # lse / delta of the block
  dq = pl.pallas_call(
      dq_kernel,
      out_shape=common.out_struct(q.shape, q.dtype, *operands),
      grid=(nq, batch, num_heads),
      in_specs=[
          pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),  # lo: the batch row
          pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),  # hi
          pl.BlockSpec((None, None, nk), lambda i, b, h: (b, i, 0)),  # kinds of this query block
          q_blk, kv_all, kv_all, q_blk, row, row,  # q, k, v, do, lse, delta
          pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),  # segment ids row
          pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),  # group ids row
      ],
      out_specs=q_blk,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(
          flops=6 * batch * num_heads * seq * seq * head_dim,
          transcendentals=batch * num_heads * seq * seq,
          bytes_accessed=(q.size * 3 + (k.size + v.size) * rep * nq) * itemsize),
      interpret=interpret,
      name="flash_attention_dq_triton",
  )(lo, hi, kinds, q, k, v, do, lse, delta, segment_ids, group_ids)

  # --- dK, dV: one program per (key block, batch, kv head) ----------------------
  # Loops over the rep query heads sharing the kv head (grouped-query
  # attention, Ainslie et al. 2023), then over active query blocks.
  kinds_t = jnp.swapaxes(kinds, 1, 2)  # [B, nk, nq]
  lo_t, hi_t = attention_mask.active_range(kinds_t)  # [B, nk]

  def dkv_kernel(lo_ref, hi_ref, kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 seg_ref, grp_ref, dk_ref, dv_ref):
    ki = pl.program_id(0)
    k_blk, v_blk = k_ref[...], v_ref[...]  # [bk, D]

    def step(carry, masked: bool, r, qi):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(qi * bq, bq), bq)
      q, do = q_ref[rows, r, :], do_ref[rows, r, :]  # [bq, D]
      mask = _mask(seg_ref, grp_ref, qi, ki, bq, bk) if masked else None
      p, ds = p_and_ds(q, k_blk, v_blk, do, lse_ref[r, rows], delta_ref[r, rows], mask)
      dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
      dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
      return dk, dv

    def head(r, carry):
      def body(qi, c):
        return _by_kind(kinds_ref[qi], lambda c, masked: step(c, masked, r, qi), c)
      return jax.lax.fori_loop(lo_ref[ki], hi_ref[ki], body, carry)

    zeros = jnp.zeros((bk, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, rep, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  k_blk = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0))  # this block
  # All query rows of the rep heads g * rep ... g * rep + rep - 1 (a rep-wide head block).
  q_heads = pl.BlockSpec((None, seq, rep, head_dim), lambda j, b, g: (b, 0, g, 0))
  rows_heads = pl.BlockSpec((None, rep, seq), lambda j, b, g: (b, g, 0))  # their lse / delta
  dk, dv = pl.pallas_call(
      dkv_kernel,
      out_shape=[common.out_struct(k.shape, k.dtype, *operands),
                 common.out_struct(v.shape, v.dtype, *operands)],
      grid=(nk, batch, num_kv),
      in_specs=[
          pl.BlockSpec((None, nk), lambda j, b, g: (b, 0)),  # lo_t: the batch row
          pl.BlockSpec((None, nk), lambda j, b, g: (b, 0)),  # hi_t
          pl.BlockSpec((None, None, nq), lambda j, b, g: (b, j, 0)),  # kinds of this key block
          q_heads, k_blk, k_blk, q_heads, rows_heads, rows_heads,  # q, k, v, do, lse, delta
          pl.BlockSpec((None, seq), lambda j, b, g: (b, 0)),  # segment ids row
          pl.BlockSpec((None, seq), lambda j, b, g: (b, 0)),  # group ids row
      ],
      out_specs=[k_blk, k_blk],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(
          flops=8 * batch * num_heads * seq * seq * head_dim,
          transcendentals=batch * num_heads * seq * seq,
          bytes_accessed=((q.size + do.size) * nk + (k.size + v.size) * 2) * itemsize),
      interpret=interpret,
      name="flash_attention_dkv_triton",
  )(lo_t, hi_t, kinds_t, q, k, v, do, lse, delta, segment_ids, group_ids)
  return dq, dk, dv
