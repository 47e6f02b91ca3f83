"""Mosaic (TPU) bodies of the flash attention kernels: forward, dQ and dK/dV.

FlashAttention-2 (Dao 2023, arXiv 2307.08691) with the key-block loop on the
innermost, sequential grid axis and the running max / sum / output in VMEM
scratch. Per (query block, key block) pair a scalar-prefetched SMEM table says
skip / partial / full (attention_mask.block_kinds); skipped pairs do no
compute and their index maps re-name the previous block, so no DMA either.
The table holds 4 bytes per (batch, query block, key block): for long
sequences prefer larger blocks (e.g. 512) to keep it small.

Layouts: heads are folded into the lane axis ([B, S, H * D], one D-wide block
per head) when D % 128 == 0, which avoids transposes; otherwise arrays are
made head-major ([B, H, S, D]). Query-side ids are [B, S, 1] columns, key-side
ids [B, 1, S] rows, log-sum-exp and delta [B, H, S, 1], so every block's
minor dims are legal Mosaic tiles. Inputs arrive padded to the blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import attention_mask
from pallas_kernels import common

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How [B, S, N, D] activations are laid out for the kernel, and their BlockSpecs."""
  folded: bool  # [B, S, N * D] (D % 128 == 0) rather than [B, N, S, D]
  head_dim: int

  def to_kernel(self, x: jax.Array) -> jax.Array:
    """[B, S, N, D] -> kernel layout."""
    b, s, n, d = x.shape
    return x.reshape(b, s, n * d) if self.folded else jnp.swapaxes(x, 1, 2)

  def from_kernel(self, x: jax.Array, num_heads: int) -> jax.Array:
    """Kernel layout -> [B, S, N, D]."""
    if self.folded:
      return x.reshape(x.shape[0], x.shape[1], num_heads, self.head_dim)
    return jnp.swapaxes(x, 1, 2)

  def spec(self, block: int, index) -> pl.BlockSpec:
    """BlockSpec of a [block, D] tile; `index(*grid_and_prefetch)` -> (batch, head, seq block)."""
    if self.folded:
      def folded_map(*args):
        b, h, s = index(*args)
        return b, s, h  # head h is the h-th D-wide lane block
      return pl.BlockSpec((None, block, self.head_dim), folded_map)

    def head_major_map(*args):
      b, h, s = index(*args)
      return b, h, s, 0
    return pl.BlockSpec((None, None, block, self.head_dim), head_major_map)


def _mask(q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, q_block, k_block, bq, bk):
  """[bq, bk] bool: the rule for one block pair (ids as [bq, 1] columns and [1, bk] rows)."""
  q_pos = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_block * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return attention_mask.allowed(q_seg_ref[...], q_grp_ref[...], q_pos,
                                k_seg_ref[...], k_grp_ref[...], k_pos)


def _block_info(kinds: jax.Array) -> jax.Array:
  """Flat SMEM table of a [B, n_outer, n_inner] kinds array: fetch_block * 4 + kind.

  One packed int32 per grid step (half the SMEM of two tables): the kind
  (attention_mask.BLOCK_*) and the inner block to fetch (fetch_blocks).
  """
  return (attention_mask.fetch_blocks(kinds) * 4 + kinds).reshape(-1)


def _kind(info, idx):
  """Block kind of grid step `idx` (lax.rem / lax.div: Mosaic lowers % and // via sign)."""
  return jax.lax.rem(info[idx], 4)


def _fetch(info, idx):
  """Inner block index to fetch at grid step `idx`."""
  return jax.lax.div(info[idx], 4)


def _ids(segment_ids, group_ids):
  """[B, S] ids -> query-side [B, S, 1] columns and key-side [B, 1, S] rows."""
  return (segment_ids[:, :, None], group_ids[:, :, None],
          segment_ids[:, None, :], group_ids[:, None, :])


def forward(q, k, v, segment_ids, group_ids, *, scale, block_q, block_k, interpret):
  """Padded q [B, S, H, D], k/v [B, S, KV, D], ids [B, S] -> (out [B, S, H, D], lse [B, H, S])."""
  batch, seq, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  rep = num_heads // num_kv
  bq, bk = block_q, block_k
  nq, nk = seq // bq, seq // bk
  layout = _Layout(folded=head_dim % 128 == 0, head_dim=head_dim)
  info = _block_info(attention_mask.block_kinds(segment_ids, group_ids, bq, bk))

  def kernel(info_ref, q_ref, k_ref, v_ref, q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref,
             o_ref, lse_ref, m_ref, l_ref, acc_ref):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kind = _kind(info_ref, (b * nq + qi) * nk + ki)

    @pl.when(ki == 0)
    def _init():
      m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
      l_ref[...] = jnp.zeros_like(l_ref)
      acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked: bool):
      s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT,
                              preferred_element_type=jnp.float32) * scale  # [bq, bk]
      if masked:
        s = jnp.where(_mask(q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, qi, ki, bq, bk),
                      s, common.MASK_VALUE)
      m_prev = m_ref[...]  # [bq, 1]
      m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
      p = jnp.exp(s - m_next)
      correction = jnp.exp(m_prev - m_next)
      l_ref[...] = correction * l_ref[...] + p.sum(axis=-1, keepdims=True)
      acc_ref[...] = correction * acc_ref[...] + jnp.dot(
          p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
      m_ref[...] = m_next

    pl.when(kind == attention_mask.BLOCK_PARTIAL)(functools.partial(step, True))
    pl.when(kind == attention_mask.BLOCK_FULL)(functools.partial(step, False))

    @pl.when(ki == nk - 1)
    def _store():
      l = l_ref[...]
      o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
      lse_ref[...] = m_ref[...] + jnp.log(l)

  # Index maps get (b, h, qi, ki, info).
  def kv_block(b, h, qi, ki, info):
    # k/v: the query head's kv head (lax.div: Mosaic lowers // through sign);
    # skipped steps re-name the last fetched block.
    return b, jax.lax.div(h, rep), _fetch(info, (b * nq + qi) * nk + ki)

  in_specs = [
      layout.spec(bq, lambda b, h, qi, ki, *_: (b, h, qi)),  # q: this query block
      layout.spec(bk, kv_block),  # k
      layout.spec(bk, kv_block),  # v
      pl.BlockSpec((None, bq, 1), lambda b, h, qi, ki, *_: (b, qi, 0)),  # query seg ids
      pl.BlockSpec((None, bq, 1), lambda b, h, qi, ki, *_: (b, qi, 0)),  # query group ids
      pl.BlockSpec((None, 1, bk), lambda b, h, qi, ki, info:  # key seg ids
                   (b, 0, _fetch(info, (b * nq + qi) * nk + ki))),
      pl.BlockSpec((None, 1, bk), lambda b, h, qi, ki, info:  # key group ids
                   (b, 0, _fetch(info, (b * nq + qi) * nk + ki))),
  ]
  out_specs = [
      layout.spec(bq, lambda b, h, qi, ki, *_: (b, h, qi)),  # out: resident over ki
      pl.BlockSpec((None, None, bq, 1), lambda b, h, qi, ki, *_: (b, h, qi, 0)),  # lse
  ]
  q_k = layout.to_kernel(q)
  operands = (q, k, v, segment_ids, group_ids)
  out_shape = [common.out_struct(q_k.shape, q.dtype, *operands),
               common.out_struct((batch, num_heads, seq, 1), jnp.float32, *operands)]
  itemsize = jnp.dtype(q.dtype).itemsize
  cost = pl.CostEstimate(
      flops=4 * batch * num_heads * seq * seq * head_dim,
      transcendentals=batch * num_heads * seq * seq,
      bytes_accessed=(q.size * 2 + (k.size + v.size) * rep * nq) * itemsize)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_heads, nq, nk),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32),  # running max
                          pltpu.VMEM((bq, 1), jnp.float32),  # running sum
                          pltpu.VMEM((bq, head_dim), jnp.float32)]),  # running output
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="flash_attention_fwd_mosaic",
  )(info, q_k, layout.to_kernel(k), layout.to_kernel(v), *_ids(segment_ids, group_ids))
  return layout.from_kernel(out, num_heads), lse[..., 0]


def backward(q, k, v, segment_ids, group_ids, lse, delta, do, *, scale, block_q, block_k,
             interpret):
  """Padded inputs (lse, delta [B, H, S] float32; do like q) -> (dq, dk, dv)."""
  batch, seq, num_heads, head_dim = q.shape
  operands = (q, k, v, segment_ids, group_ids, lse, delta, do)  # outputs vary like these
  num_kv = k.shape[2]
  rep = num_heads // num_kv
  bq, bk = block_q, block_k
  nq, nk = seq // bq, seq // bk
  layout = _Layout(folded=head_dim % 128 == 0, head_dim=head_dim)
  kinds = attention_mask.block_kinds(segment_ids, group_ids, bq, bk)  # [B, nq, nk]
  q_k, k_k, v_k, do_k = (layout.to_kernel(x) for x in (q, k, v, do))
  lse4, delta4 = lse[..., None], delta[..., None]  # [B, H, S, 1]
  ids = _ids(segment_ids, group_ids)
  itemsize = jnp.dtype(q.dtype).itemsize

  def p_and_ds(q, k, v, do, lse, delta, mask):
    """Softmax probabilities and score gradients of one block pair, [bq, bk] f32."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    return p, p * (dp - delta)

  # --- dQ: grid (b, h, qi, ki), ki sequential ----------------------------------
  dq_info = _block_info(kinds)

  def dq_kernel(info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, dq_ref, acc_ref):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kind = _kind(info_ref, (b * nq + qi) * nk + ki)

    @pl.when(ki == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked: bool):
      mask = _mask(q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, qi, ki, bq, bk) if masked else None
      _, ds = p_and_ds(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                       delta_ref[...], mask)
      acc_ref[...] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...],
                              preferred_element_type=jnp.float32)

    pl.when(kind == attention_mask.BLOCK_PARTIAL)(functools.partial(step, True))
    pl.when(kind == attention_mask.BLOCK_FULL)(functools.partial(step, False))

    @pl.when(ki == nk - 1)
    def _store():
      dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)

  def dq_kv_block(b, h, qi, ki, info):
    # k/v: the query head's kv head; skipped steps re-name the last fetched block.
    return b, jax.lax.div(h, rep), _fetch(info, (b * nq + qi) * nk + ki)

  q_side = lambda b, h, qi, ki, *_: (b, h, qi)  # this query block of head h
  dq = pl.pallas_call(
      dq_kernel,
      out_shape=common.out_struct(q_k.shape, q.dtype, *operands),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_heads, nq, nk),
          in_specs=[
              layout.spec(bq, q_side),  # q
              layout.spec(bk, dq_kv_block),  # k
              layout.spec(bk, dq_kv_block),  # v
              layout.spec(bq, q_side),  # do
              pl.BlockSpec((None, None, bq, 1), lambda b, h, qi, ki, *_: (b, h, qi, 0)),  # lse
              pl.BlockSpec((None, None, bq, 1), lambda b, h, qi, ki, *_: (b, h, qi, 0)),  # delta
              pl.BlockSpec((None, bq, 1), lambda b, h, qi, ki, *_: (b, qi, 0)),  # query seg
              pl.BlockSpec((None, bq, 1), lambda b, h, qi, ki, *_: (b, qi, 0)),  # query group
              pl.BlockSpec((None, 1, bk), lambda b, h, qi, ki, info:  # key seg
                           (b, 0, _fetch(info, (b * nq + qi) * nk + ki))),
              pl.BlockSpec((None, 1, bk), lambda b, h, qi, ki, info:  # key group
                           (b, 0, _fetch(info, (b * nq + qi) * nk + ki))),
          ],
          out_specs=layout.spec(bq, q_side),  # dq: resident over ki
          scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=6 * batch * num_heads * seq * seq * head_dim,
          transcendentals=batch * num_heads * seq * seq,
          bytes_accessed=(q.size * 3 + (k.size + v.size) * rep * nq) * itemsize),
      interpret=interpret,
      name="flash_attention_dq_mosaic",
  )(dq_info, q_k, k_k, v_k, do_k, lse4, delta4, *ids)

  # --- dK, dV: grid (b, kv head, ki, r, qi), (r, qi) sequential ------------------
  # Query head h = kv_head * rep + r; the rep query heads of a kv head all add
  # into its dK / dV (grouped-query attention, Ainslie et al. 2023).
  kv_info = _block_info(jnp.swapaxes(kinds, 1, 2))  # over [B, nk, nq]

  def dkv_kernel(info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, dk_ref, dv_ref, dk_acc, dv_acc):
    b, ki, r, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    kind = _kind(info_ref, (b * nk + ki) * nq + qi)

    @pl.when((r == 0) & (qi == 0))
    def _init():
      dk_acc[...] = jnp.zeros_like(dk_acc)
      dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked: bool):
      mask = _mask(q_seg_ref, q_grp_ref, k_seg_ref, k_grp_ref, qi, ki, bq, bk) if masked else None
      q, do = q_ref[...], do_ref[...]
      p, ds = p_and_ds(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask)
      dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                         preferred_element_type=jnp.float32)  # [bk, D]
      dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                         preferred_element_type=jnp.float32)  # [bk, D]

    pl.when(kind == attention_mask.BLOCK_PARTIAL)(functools.partial(step, True))
    pl.when(kind == attention_mask.BLOCK_FULL)(functools.partial(step, False))

    @pl.when((r == rep - 1) & (qi == nq - 1))
    def _store():
      dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

  # Index maps get (b, g, ki, r, qi, info); g is the kv head.
  def q_block(b, g, ki, r, qi, info):
    # q-side tiles: query head g * rep + r; skipped steps re-name the last block.
    return b, g * rep + r, _fetch(info, (b * nk + ki) * nq + qi)

  def q_column(b, g, ki, r, qi, info):
    # [B, H, S, 1] lse / delta column of the same query block.
    return b, g * rep + r, _fetch(info, (b * nk + ki) * nq + qi), 0

  def q_ids(b, g, ki, r, qi, info):
    # [B, S, 1] query ids of the same query block.
    return b, _fetch(info, (b * nk + ki) * nq + qi), 0

  k_side = lambda b, g, ki, r, qi, *_: (b, g, ki)  # this key block of kv head g
  dk, dv = pl.pallas_call(
      dkv_kernel,
      out_shape=[common.out_struct(k_k.shape, k.dtype, *operands),
                 common.out_struct(v_k.shape, v.dtype, *operands)],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv, nk, rep, nq),
          in_specs=[
              layout.spec(bq, q_block),  # q
              layout.spec(bk, k_side),  # k
              layout.spec(bk, k_side),  # v
              layout.spec(bq, q_block),  # do
              pl.BlockSpec((None, None, bq, 1), q_column),  # lse
              pl.BlockSpec((None, None, bq, 1), q_column),  # delta
              pl.BlockSpec((None, bq, 1), q_ids),  # query seg
              pl.BlockSpec((None, bq, 1), q_ids),  # query group
              pl.BlockSpec((None, 1, bk), lambda b, g, ki, r, qi, *_: (b, 0, ki)),  # key seg
              pl.BlockSpec((None, 1, bk), lambda b, g, ki, r, qi, *_: (b, 0, ki)),  # key group
          ],
          out_specs=[layout.spec(bk, k_side), layout.spec(bk, k_side)],  # resident over (r, qi)
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                          pltpu.VMEM((bk, head_dim), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=8 * batch * num_heads * seq * seq * head_dim,
          transcendentals=batch * num_heads * seq * seq,
          bytes_accessed=((q.size + do.size) * nk + (k.size + v.size) * 2) * itemsize),
      interpret=interpret,
      name="flash_attention_dkv_mosaic",
  )(kv_info, q_k, k_k, v_k, do_k, lse4, delta4, *ids)
  return (layout.from_kernel(dq, num_heads), layout.from_kernel(dk, num_kv),
          layout.from_kernel(dv, num_kv))
