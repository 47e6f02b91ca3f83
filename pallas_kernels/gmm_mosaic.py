"""Mosaic (TPU) bodies of the grouped matmul kernels.

The grid walks a list of (row tile, group) *visits* built up front from the
group offsets and scalar-prefetched into SMEM, so the BlockSpec index maps
can pick the right lhs tile and weight group per grid step (the megablox
scheme, Gale et al. 2023, "MegaBlocks"). The visit axis has a dynamic length:
empty groups add no grid steps. Operands arrive padded to the tiles by
`pallas_kernels.gmm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common


def gmm_visits(offsets: jax.Array, *, tiles_m: int, tm: int) -> tuple[jax.Array, ...]:
  """Grid metadata of the gmm: the (row tile, group) pairs to visit, in row-tile order.

  A visit computes one row tile against one group's weights. Each non-empty
  group visits the tiles its rows touch (a tile shared by two groups is
  visited twice, consecutively); empty groups get no visit at all. Tiles past
  sum(group_sizes) get one "zero" visit that only writes zeros. Because visits
  are ordered by row tile, an output tile is only revisited consecutively and
  stays resident in VMEM between its visits.

  Args:
    offsets: [G + 1] int32 group row offsets.
    tiles_m: number of row tiles (m_padded // tm).
    tm: row tile size.

  Returns:
    out_tile [V] int32: the output row tile of each visit.
    lhs_tile [V] int32: the lhs row tile to fetch (zero visits re-use the last
      real one, so they trigger no DMA).
    rhs_group [V] int32: the weight group to fetch (likewise for zero visits).
    real [V] int32: 1 for a matmul visit, 0 for a zero visit.
    num_visits [] int32: how many of the V = tiles_m + G - 1 entries are used.
  """
  num_groups = offsets.shape[0] - 1
  starts, ends = offsets[:-1], offsets[1:]  # [G]
  first_tile = starts // tm
  num_tiles = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)  # [G]
  visit_end = jnp.cumsum(num_tiles)  # [G]
  num_real = visit_end[-1]
  covered_tiles = (ends[-1] + tm - 1) // tm
  v = jnp.arange(tiles_m + num_groups - 1, dtype=jnp.int32)  # [V]
  group = jnp.minimum(common.searchsorted_right(visit_end, v), num_groups - 1)
  tile = first_tile[group] + v - (visit_end[group] - num_tiles[group])
  is_real = v < num_real
  last = jnp.maximum(num_real - 1, 0)
  last_tile = jnp.where(num_real > 0, tile[last], 0)
  last_group = jnp.where(num_real > 0, group[last], 0)
  zero_tile = jnp.minimum(covered_tiles + v - num_real, tiles_m - 1)
  out_tile = jnp.where(is_real, tile, zero_tile).astype(jnp.int32)
  lhs_tile = jnp.where(is_real, tile, last_tile).astype(jnp.int32)
  rhs_group = jnp.where(is_real, group, last_group).astype(jnp.int32)
  num_visits = (num_real + tiles_m - covered_tiles).astype(jnp.int32)
  return out_tile, lhs_tile, rhs_group, is_real.astype(jnp.int32), num_visits


def tgmm_visits(offsets: jax.Array, *, tiles_m: int, tm: int) -> tuple[jax.Array, ...]:
  """Grid metadata of the tgmm: the (row tile, group) pairs to visit, in group order.

  Each non-empty group visits the row tiles it touches; an empty group gets a
  single visit that only zeroes its [k, n] output block (no matmul).

  Returns:
    tile [V] int32, group [V] int32, num_visits [] int32 (V = tiles_m + G - 1).
  """
  num_groups = offsets.shape[0] - 1
  starts, ends = offsets[:-1], offsets[1:]  # [G]
  first_tile = jnp.minimum(starts // tm, tiles_m - 1)
  num_tiles = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 1)  # [G]
  visit_end = jnp.cumsum(num_tiles)  # [G]
  v = jnp.arange(tiles_m + num_groups - 1, dtype=jnp.int32)  # [V]
  group = jnp.minimum(common.searchsorted_right(visit_end, v), num_groups - 1)
  tile = jnp.clip(first_tile[group] + v - (visit_end[group] - num_tiles[group]), 0, tiles_m - 1)
  return tile.astype(jnp.int32), group.astype(jnp.int32), visit_end[-1].astype(jnp.int32)


def _rows_in_group(offsets_ref, group, row0, shape) -> jax.Array:
  """[tm, cols] bool: which rows of the tile starting at `row0` belong to `group`."""
  rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])


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
  """Mosaic grouped matmul on padded operands -> [m, n]."""
  tm, tk, tn = tiling
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiles_m, tiles_k, tiles_n = m // tm, k // tk, n // tn
  out_tile, lhs_tile, rhs_group, real, num_visits = gmm_visits(offsets, tiles_m=tiles_m, tm=tm)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(out_tile_ref, lhs_tile_ref, rhs_group_ref, real_ref, offsets_ref,  # SMEM
             lhs_ref, rhs_ref, out_ref, acc_ref):
    del lhs_tile_ref
    v, k_i = pl.program_id(1), pl.program_id(2)

    @pl.when(k_i == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real_ref[v] == 1)
    def _accumulate():
      acc_ref[...] += jax.lax.dot_general(
          lhs_ref[...], rhs_ref[...], contract, preferred_element_type=jnp.float32)

    @pl.when(k_i == tiles_k - 1)
    def _store():
      tile = out_tile_ref[v]
      # The first visit of a tile starts from zeros, so rows of no group (past
      # sum(group_sizes)) come out as 0; later visits keep earlier groups' rows.
      first = (v == 0) | (tile != out_tile_ref[jnp.maximum(v - 1, 0)])
      previous = jnp.where(first, 0.0, out_ref[...].astype(jnp.float32))
      mine = _rows_in_group(offsets_ref, rhs_group_ref[v], tile * tm, (tm, tn))
      mine &= real_ref[v] == 1
      out_ref[...] = jnp.where(mine, acc_ref[...], previous).astype(out_ref.dtype)

  # Index maps get (n_i, v, k_i, *prefetched metadata).
  def lhs_map(n_i, v, k_i, out_tile, lhs_tile, rhs_group, real, offsets):
    # lhs [m, k]: the visit's row tile, k-th column tile (zero visits pin the
    # last block fetched so they trigger no DMA).
    return lhs_tile[v], jnp.where(real[v] == 1, k_i, tiles_k - 1)

  def rhs_map(n_i, v, k_i, out_tile, lhs_tile, rhs_group, real, offsets):
    # rhs [G, k, n]: the visit's group, block (k_i, n_i) (or (n_i, k_i) transposed).
    k_b = jnp.where(real[v] == 1, k_i, tiles_k - 1)
    return (rhs_group[v], n_i, k_b) if transpose_rhs else (rhs_group[v], k_b, n_i)

  def out_map(n_i, v, k_i, out_tile, lhs_tile, rhs_group, real, offsets):
    # out [m, n]: the visit's output row tile, n-th column tile.
    return out_tile[v], n_i

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=(m * k * tiles_n + rhs.size) * itemsize
      + m * n * jnp.dtype(out_dtype).itemsize,
      transcendentals=0)
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((m, n), out_dtype, lhs, rhs, offsets),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(tiles_n, num_visits, tiles_k),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="gmm_mosaic",
  )(out_tile, lhs_tile, rhs_group, real, offsets, lhs, rhs)


def tgmm(
    lhs: jax.Array,  # [m, k], padded to the tiles
    grad: jax.Array,  # [m, n], padded to the tiles
    offsets: jax.Array,  # [G + 1] int32
    *,
    tiling: tuple[int, int, int],
    out_dtype: Any,
    interpret: bool,
) -> jax.Array:
  """Mosaic transposed grouped matmul on padded operands -> [G, k, n]."""
  tm, tk, tn = tiling
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = offsets.shape[0] - 1
  tiles_m, tiles_k, tiles_n = m // tm, k // tk, n // tn
  tile_ids, group_ids, num_visits = tgmm_visits(offsets, tiles_m=tiles_m, tm=tm)

  def kernel(tile_ref, group_ref, offsets_ref, lhs_ref, grad_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    last_v = pl.num_programs(2) - 1
    group = group_ref[v]
    first = (v == 0) | (group != group_ref[jnp.maximum(v - 1, 0)])
    last = (v == last_v) | (group != group_ref[jnp.minimum(v + 1, last_v)])

    @pl.when(first)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(offsets_ref[group + 1] > offsets_ref[group])
    def _accumulate():
      row0 = tile_ref[v] * tm
      # Mask both operands: rows of other groups may hold anything (even NaN).
      x = jnp.where(_rows_in_group(offsets_ref, group, row0, (tm, tk)), lhs_ref[...], 0)
      dy = jnp.where(_rows_in_group(offsets_ref, group, row0, (tm, tn)), grad_ref[...], 0)
      acc_ref[...] += jax.lax.dot_general(
          x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [tk, tn]

    @pl.when(last)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  # Index maps get (k_i, n_i, v, *prefetched metadata).
  def lhs_map(k_i, n_i, v, tile, group, offsets):
    # lhs [m, k]: the visit's row tile, k-th column tile.
    return tile[v], k_i

  def grad_map(k_i, n_i, v, tile, group, offsets):
    # grad [m, n]: the visit's row tile, n-th column tile.
    return tile[v], n_i

  def out_map(k_i, n_i, v, tile, group, offsets):
    # out [G, k, n]: the visit's group, block (k_i, n_i); revisited while the group lasts.
    return group[v], k_i, n_i

  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n,
      bytes_accessed=(m * k * tiles_n + m * n * tiles_k) * itemsize
      + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
      transcendentals=0)
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_groups, k, n), out_dtype, lhs, grad, offsets),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(tiles_k, tiles_n, num_visits),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="tgmm_mosaic",
  )(tile_ids, group_ids, offsets, lhs, grad)
