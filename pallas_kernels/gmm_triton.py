"""Triton (GPU) bodies of the grouped matmul kernels.

Triton programs run independently (no resident output block across grid
steps), so each program owns one output tile and loops inside the kernel:
the gmm over the groups its row tile touches, the tgmm over the row tiles of
its group. Group bounds come from the [G + 1] offsets array, read as scalars.
Operands arrive padded to the tiles by `pallas_kernels.gmm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

NUM_WARPS = 4
NUM_STAGES = 3


def tile_group_ranges(offsets: jax.Array, *, tiles_m: int, tm: int) -> tuple[jax.Array, jax.Array]:
  """Per row tile, the first and last group with rows in it ([tiles_m] int32 each).

  last < first when the tile lies past sum(group_sizes): its program only
  writes zeros. Empty groups between first and last are skipped in-kernel.
  """
  ends = offsets[1:]  # [G]
  total = offsets[-1]
  row0 = jnp.arange(tiles_m, dtype=jnp.int32) * tm  # [tiles_m]
  first = common.searchsorted_right(ends, row0)
  last = common.searchsorted_right(ends, jnp.minimum(row0 + tm, total) - 1)
  return first, jnp.where(row0 < total, last, first - 1)


def gmm(
    lhs: jax.Array,  # [m, k], padded to the tiles
    rhs: jax.Array,  # [G, k, n] ([G, n, k] if transpose_rhs), padded to the tiles
    offsets: jax.Array,  # [G + 1] int32
    *,
    tiling: tuple[int, int, int],
    out_dtype: Any,
    transpose_rhs: bool,
    interpret: bool,
) -> jax.Array:
  """Triton grouped matmul on padded operands -> [m, n]."""
  tm, tk, tn = tiling
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiles_m, tiles_k, tiles_n = m // tm, k // tk, n // tn
  first_group, last_group = tile_group_ranges(offsets, tiles_m=tiles_m, tm=tm)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(first_ref, last_ref, offsets_ref, lhs_ref, rhs_ref, out_ref):
    i = pl.program_id(0)
    rows = i * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)

    def group_step(g, out):
      start, end = offsets_ref[g], offsets_ref[g + 1]

      def k_step(k_i, acc):
        cols = pl.ds(pl.multiple_of(k_i * tk, tk), tk)
        x = lhs_ref[:, cols]  # [tm, tk]
        w = rhs_ref[g, :, cols] if transpose_rhs else rhs_ref[g, cols, :]
        return acc + jax.lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)

      def matmul(out):
        acc = jax.lax.fori_loop(0, tiles_k, k_step, jnp.zeros((tm, tn), jnp.float32))
        return jnp.where((rows >= start) & (rows < end), acc, out)

      # Empty groups inside the range cost one scalar compare.
      return jax.lax.cond(end > start, matmul, lambda out: out, out)

    # Rows of no group (past sum(group_sizes)) keep the initial zeros.
    out = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, group_step,
                            jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = out.astype(out_ref.dtype)

  rhs_block = (num_groups, tn, k) if transpose_rhs else (num_groups, k, tn)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=(m * k * tiles_n + rhs.size) * itemsize
      + m * n * jnp.dtype(out_dtype).itemsize,
      transcendentals=0)
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((m, n), out_dtype, lhs, rhs, offsets),
      grid=(tiles_m, tiles_n),
      in_specs=[
          # Metadata: whole arrays, read as scalars.
          pl.BlockSpec((tiles_m,), lambda i, j: (0,)),
          pl.BlockSpec((tiles_m,), lambda i, j: (0,)),
          pl.BlockSpec((num_groups + 1,), lambda i, j: (0,)),
          # lhs [m, k]: the program's row tile, all of k (sliced in the k loop).
          pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
          # rhs: all groups and k, the program's n-th column tile.
          pl.BlockSpec(rhs_block, lambda i, j: (0, j, 0) if transpose_rhs else (0, 0, j)),
      ],
      # out [m, n]: one tile per program.
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=cost,
      interpret=interpret,
      name="gmm_triton",
  )(first_group, last_group, offsets, lhs, rhs)


def tgmm(
    lhs: jax.Array,  # [m, k], padded to the tiles
    grad: jax.Array,  # [m, n], padded to the tiles
    offsets: jax.Array,  # [G + 1] int32
    *,
    tiling: tuple[int, int, int],
    out_dtype: Any,
    interpret: bool,
) -> jax.Array:
  """Triton transposed grouped matmul on padded operands -> [G, k, n]."""
  tm, tk, tn = tiling
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = offsets.shape[0] - 1
  tiles_k, tiles_n = k // tk, n // tn

  def kernel(offsets_ref, lhs_ref, grad_ref, out_ref):
    g = pl.program_id(0)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    # Row tiles touched by the group; none for an empty group (zeros stored).
    first_tile = start // tm
    end_tile = jnp.where(end > start, (end + tm - 1) // tm, first_tile)

    def row_step(t, acc):
      row0 = pl.multiple_of(t * tm, tm)
      rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      mine = (rows >= start) & (rows < end)  # [tm, 1]
      # Mask both operands: rows of other groups may hold anything (even NaN).
      x = jnp.where(mine, lhs_ref[pl.ds(row0, tm), :], 0)  # [tm, tk]
      dy = jnp.where(mine, grad_ref[pl.ds(row0, tm), :], 0)  # [tm, tn]
      return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first_tile, end_tile, row_step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=(m * k * tiles_n + m * n * tiles_k) * itemsize
      + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
      transcendentals=0)
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_groups, k, n), out_dtype, lhs, grad, offsets),
      grid=(num_groups, tiles_k, tiles_n),
      in_specs=[
          pl.BlockSpec((num_groups + 1,), lambda g, a, b: (0,)),  # offsets: whole array
          pl.BlockSpec((m, tk), lambda g, a, b: (0, a)),  # lhs: all rows, a-th column tile
          pl.BlockSpec((m, tn), lambda g, a, b: (0, b)),  # grad: all rows, b-th column tile
      ],
      # out [G, k, n]: group g, block (a, b); one program per block.
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=cost,
      interpret=interpret,
      name="tgmm_triton",
  )(offsets, lhs, grad)
