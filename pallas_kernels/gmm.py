"""Grouped matmul for MoE expert dispatch: entry points, tiling, metadata, references.

Rows of `lhs` are sorted by group (expert): group g owns rows
[offsets[g], offsets[g + 1]) with offsets = [0, cumsum(group_sizes)].

  gmm(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]
      out[r] = lhs[r] @ rhs[g(r)];  rows past sum(group_sizes) are exactly 0.
  tgmm(lhs [m, k], grad [m, n], group_sizes [G]) -> [G, k, n]
      out[g] = lhs[rows of g].T @ grad[rows of g];  empty groups give 0.

`tgmm` is the weight gradient of `gmm`; `pallas_kernels.ops.grouped_matmul`
ties the two with a custom VJP. The kernel bodies live in `gmm_mosaic.py` (TPU)
and `gmm_triton.py` (GPU), each with the per-grid metadata it needs; this
module validates, pads to the tiles, computes the group offsets both bodies
read, and holds the pure-jnp references.

group_sizes must be non-negative; a sum larger than m is truncated at m (the
last groups lose their tail rows), a smaller sum leaves zero rows at the end.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import gmm_mosaic
from pallas_kernels import gmm_triton


@dataclasses.dataclass(frozen=True)
class GmmTiling:
  """Tile sizes of the grouped matmul kernels: rows (tm), contraction (tk), columns (tn).

  A tile larger than its dimension shrinks to fit (to the whole dimension on
  Mosaic, to the next power of two >= 16 on Triton), so small problems need
  no special tiling. Hardware limits of the tiles actually used are checked
  per backend outside interpret mode: Mosaic needs tm % 8 == 0 and
  tk, tn % 128 == 0; Triton needs powers of two >= 16.
  """
  tm: int = 128
  tk: int = 128
  tn: int = 128

  def __post_init__(self):
    for name in ("tm", "tk", "tn"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
        raise ValueError(f"GmmTiling.{name}={value!r} must be an int >= 8 and a multiple of 8.")


# Per-backend defaults used when `tiling=None`. Mosaic: MXU-sized 128 tiles.
# Triton: 64-row tiles waste less at group boundaries (MoE groups are often
# only ~m/G rows), 128-wide columns keep the tensor cores busy.
MOSAIC_TILING = GmmTiling(tm=128, tk=128, tn=128)
TRITON_TILING = GmmTiling(tm=64, tk=64, tn=128)


def fit_tiling(tiling: GmmTiling, m: int, k: int, n: int, *, backend: str,
               interpret: bool) -> tuple[int, int, int]:
  """Shrinks `tiling` to the problem, checks the backend's tile limits -> (tm, tk, tn)."""
  def fit(tile: int, dim: int) -> int:
    if backend == "mosaic":
      return dim if dim <= tile else tile  # a whole dimension is always a legal block
    return min(tile, common.next_power_of_2(max(dim, 16)))

  tiles = (fit(tiling.tm, m), fit(tiling.tk, k), fit(tiling.tn, n))
  if interpret:
    return tiles
  for name, tile, dim, align in zip(("tm", "tk", "tn"), tiles, (m, k, n), (8, 128, 128)):
    if backend == "mosaic" and tile != dim and tile % align:
      raise ValueError(
          f"tiling.{name}={tile} must be a multiple of {align} for the Mosaic (TPU) body "
          f"when the dimension ({dim}) is larger than the tile.")
    if backend == "triton" and (tile < 16 or tile & (tile - 1)):
      raise ValueError(
          f"tiling.{name}={tile} must be a power of two >= 16 for the Triton (GPU) body.")
  return tiles


def group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """[G] sizes -> [G + 1] int32 row offsets [0, cumsum(sizes)], clipped to [0, m]."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), m).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def validate_args(lhs, rhs, group_sizes, *, rhs_name: str, transpose_rhs: bool = False) -> None:
  """Shape/dtype checks shared by gmm and tgmm (raise before any lowering)."""
  if lhs.ndim != 2:
    raise ValueError(f"lhs.shape={tuple(lhs.shape)} but expected [m, k] (2-D).")
  common.check_float_dtype("lhs", lhs)
  common.check_float_dtype(rhs_name, rhs)
  if jnp.dtype(lhs.dtype) != jnp.dtype(rhs.dtype):
    raise ValueError(f"lhs.dtype={lhs.dtype} and {rhs_name}.dtype={rhs.dtype} must match.")
  if group_sizes.ndim != 1:
    raise ValueError(
        f"group_sizes.shape={tuple(group_sizes.shape)} but expected [num_groups] (1-D).")
  if jnp.dtype(group_sizes.dtype) != jnp.dtype(jnp.int32):
    raise ValueError(f"group_sizes.dtype={group_sizes.dtype} but expected int32.")
  if group_sizes.shape[0] < 1:
    raise ValueError("group_sizes must have at least one group.")
  m, k = lhs.shape
  if rhs_name == "rhs":
    num_groups = group_sizes.shape[0]
    expected = "[num_groups, n, k]" if transpose_rhs else "[num_groups, k, n]"
    k_axis = 2 if transpose_rhs else 1
    if rhs.ndim != 3 or rhs.shape[0] != num_groups or rhs.shape[k_axis] != k:
      raise ValueError(
          f"rhs.shape={tuple(rhs.shape)} but expected {expected} with "
          f"num_groups={num_groups} (group_sizes.shape[0]) and k={k} (lhs.shape[1]).")
  else:
    if rhs.ndim != 2 or rhs.shape[0] != m:
      raise ValueError(
          f"{rhs_name}.shape={tuple(rhs.shape)} but expected [m, n] with m={m} (lhs.shape[0]).")


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
  """Zero-pads the last two axes of `x` to multiples of (rows, cols)."""
  x = common.pad_axis(x, x.ndim - 2, common.round_up(x.shape[-2], rows))
  return common.pad_axis(x, x.ndim - 1, common.round_up(x.shape[-1], cols))


@functools.partial(jax.jit, static_argnames=(
    "tiling", "preferred_element_type", "transpose_rhs", "backend", "interpret"))
def gmm(
    lhs: jax.Array,  # [m, k]
    rhs: jax.Array,  # [num_groups, k, n] ([num_groups, n, k] if transpose_rhs)
    group_sizes: jax.Array,  # [num_groups] int32
    *,
    tiling: GmmTiling | None = None,
    preferred_element_type: Any = None,
    transpose_rhs: bool = False,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Grouped matmul: out[r] = lhs[r] @ rhs[group(r)], zeros past sum(group_sizes).

  Args:
    lhs: [m, k] rows sorted by group.
    rhs: [num_groups, k, n] per-group weights ([num_groups, n, k] and used
      transposed when `transpose_rhs`).
    group_sizes: [num_groups] int32 rows per group.
    tiling: tile sizes; None picks the backend's default.
    preferred_element_type: output dtype (default: lhs.dtype); accumulation is
      always float32.
    transpose_rhs: contract lhs with the last axis of rhs.
    backend: "auto" (TPU -> Mosaic, GPU -> Triton), "mosaic" or "triton".
    interpret: run the kernel through the Pallas interpreter (CPU tests).

  Returns:
    [m, n] in `preferred_element_type`.
  """
  common.check_backend(backend)
  validate_args(lhs, rhs, group_sizes, rhs_name="rhs", transpose_rhs=transpose_rhs)
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  offsets = group_offsets(group_sizes, m)  # [G + 1]

  def run(body_name: str, lhs, rhs, offsets):
    default = MOSAIC_TILING if body_name == "mosaic" else TRITON_TILING
    tm, tk, tn = tiles = fit_tiling(tiling or default, m, k, n, backend=body_name,
                                    interpret=interpret)
    lhs_p = _pad2(lhs, tm, tk)  # [m_p, k_p]
    rhs_p = _pad2(rhs, tn, tk) if transpose_rhs else _pad2(rhs, tk, tn)
    body = gmm_mosaic.gmm if body_name == "mosaic" else gmm_triton.gmm
    out = body(lhs_p, rhs_p, offsets, tiling=tiles, out_dtype=out_dtype,
               transpose_rhs=transpose_rhs, interpret=interpret)
    return out[:m, :n]

  return common.dispatch(backend, interpret, functools.partial(run, "mosaic"),
                         functools.partial(run, "triton"), lhs, rhs, offsets)


@functools.partial(jax.jit, static_argnames=(
    "tiling", "preferred_element_type", "backend", "interpret"))
def tgmm(
    lhs: jax.Array,  # [m, k]
    grad: jax.Array,  # [m, n]
    group_sizes: jax.Array,  # [num_groups] int32
    *,
    tiling: GmmTiling | None = None,
    preferred_element_type: Any = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ grad[rows of g].

  This is the weight gradient of `gmm`. Empty groups give zero blocks (one
  store, no matmul). Arguments as in `gmm`.

  Returns:
    [num_groups, k, n] in `preferred_element_type` (default: lhs.dtype).
  """
  common.check_backend(backend)
  validate_args(lhs, grad, group_sizes, rhs_name="grad")
  m, k = lhs.shape
  n = grad.shape[1]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  offsets = group_offsets(group_sizes, m)

  def run(body_name: str, lhs, grad, offsets):
    default = MOSAIC_TILING if body_name == "mosaic" else TRITON_TILING
    tm, tk, tn = tiles = fit_tiling(tiling or default, m, k, n, backend=body_name,
                                    interpret=interpret)
    lhs_p = _pad2(lhs, tm, tk)  # [m_p, k_p]
    grad_p = _pad2(grad, tm, tn)  # [m_p, n_p]
    body = gmm_mosaic.tgmm if body_name == "mosaic" else gmm_triton.tgmm
    out = body(lhs_p, grad_p, offsets, tiling=tiles, out_dtype=out_dtype, interpret=interpret)
    return out[:, :k, :n]

  return common.dispatch(backend, interpret, functools.partial(run, "mosaic"),
                         functools.partial(run, "triton"), lhs, grad, offsets)


def _row_group_one_hot(group_sizes: jax.Array, m: int) -> jax.Array:
  """[m, G] float32: 1 where row r belongs to group g (rows past the sum: all 0)."""
  offsets = group_offsets(group_sizes, m)
  rows = jnp.arange(m)[:, None]  # [m, 1]
  return ((rows >= offsets[None, :-1]) & (rows < offsets[None, 1:])).astype(jnp.float32)


def gmm_reference(
    lhs: jax.Array,  # [m, k]
    rhs: jax.Array,  # [num_groups, k, n]
    group_sizes: jax.Array,  # [num_groups] int32
    *,
    tiling: GmmTiling | None = None,
    preferred_element_type: Any = None,
    transpose_rhs: bool = False,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Pure-jnp gmm (same signature): one-hot row->group masks, no loops. O(m*G*k*n)."""
  del tiling, backend, interpret
  validate_args(lhs, rhs, group_sizes, rhs_name="rhs", transpose_rhs=transpose_rhs)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  one_hot = _row_group_one_hot(group_sizes, lhs.shape[0])  # [m, G]
  rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs  # [G, k, n]
  per_group = jnp.einsum("mk,gkn->gmn", lhs, rhs, preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)  # [G, m, n]
  return jnp.einsum("gmn,mg->mn", per_group, one_hot,
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,  # [m, k]
    grad: jax.Array,  # [m, n]
    group_sizes: jax.Array,  # [num_groups] int32
    *,
    tiling: GmmTiling | None = None,
    preferred_element_type: Any = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Pure-jnp tgmm (same signature): out[g] = sum over rows r of g of lhs[r] (x) grad[r]."""
  del tiling, backend, interpret
  validate_args(lhs, grad, group_sizes, rhs_name="grad")
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  one_hot = _row_group_one_hot(group_sizes, lhs.shape[0])  # [m, G]
  return jnp.einsum("mk,mg,mn->gkn", lhs.astype(jnp.float32), one_hot, grad.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)
