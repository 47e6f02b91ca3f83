"""Grouped matmul kernels (Mosaic and Triton bodies, interpret mode) vs the references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import gmm as gmm_lib
from pallas_kernels import gmm_mosaic
from pallas_kernels import gmm_triton

BACKENDS = ("mosaic", "triton")
TILING = pallas_kernels.GmmTiling(tm=16, tk=16, tn=16)
M, K, N, G = 64, 32, 48, 6  # one shape (one compile per backend/dtype); group layouts vary
# max |kernel - reference| <= ATOL + RTOL * max |reference|, per dtype. float32 is
# exact up to summation order; bfloat16 outputs are rounded to 8 mantissa bits.
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (0.0, 1e-2)}
GRAD_TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (0.0, 2e-2)}

# Row counts per group (sum <= M unless noted): ragged, empty groups at the
# start / middle / end, a group spanning tiles, sum < M (zero tail), all rows
# in one group, every group empty, and a sum > M (truncated at M).
GROUP_LAYOUTS = {
    "ragged": [5, 17, 0, 9, 20, 13],
    "empty_ends": [0, 0, 30, 1, 15, 0],
    "tail_rows": [3, 0, 8, 0, 11, 2],
    "one_group": [0, 0, 0, M, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
    "truncated": [20, 20, 20, 20, 0, 20],
}


def assert_close(actual, expected, tol):
  atol, rtol = tol
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  bound = atol + rtol * max(np.abs(expected).max(), 1e-6)
  np.testing.assert_array_less(np.abs(actual - expected).max(), bound + 1e-12)


@pytest.fixture(scope="module")
def operands():
  rng = np.random.default_rng(0)
  lhs = rng.normal(size=(M, K)).astype(np.float32)
  rhs = rng.normal(size=(G, K, N)).astype(np.float32) / np.sqrt(K)
  grad = rng.normal(size=(M, N)).astype(np.float32)
  return lhs, rhs, grad


def _sizes(name):
  return jnp.asarray(GROUP_LAYOUTS[name], jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_forward_matches_reference(operands, backend, dtype):
  lhs, rhs, _ = operands
  lhs, rhs = jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)
  for name in GROUP_LAYOUTS:
    sizes = _sizes(name)
    out = gmm_lib.gmm(lhs, rhs, sizes, tiling=TILING, backend=backend, interpret=True)
    assert out.shape == (M, N) and out.dtype == dtype, name
    assert_close(out, pallas_kernels.gmm_reference(lhs, rhs, sizes), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_rows_past_sum_are_zero_even_with_nan_inputs(operands, backend):
  lhs, rhs, _ = operands
  sizes = _sizes("tail_rows")  # 24 of 64 rows used
  used = int(np.sum(GROUP_LAYOUTS["tail_rows"]))
  lhs = jnp.asarray(lhs).at[used:].set(jnp.nan)  # garbage in the unused rows
  out = np.asarray(gmm_lib.gmm(lhs, jnp.asarray(rhs), sizes, tiling=TILING, backend=backend,
                               interpret=True))
  assert np.all(out[used:] == 0.0)
  assert np.all(np.isfinite(out[:used]))
  all_empty = gmm_lib.gmm(jnp.asarray(operands[0]), jnp.asarray(rhs), _sizes("all_empty"),
                          tiling=TILING, backend=backend, interpret=True)
  assert np.all(np.asarray(all_empty) == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_matches_ragged_dot_and_transposed_rhs(operands, backend):
  lhs, rhs, grad = (jnp.asarray(x) for x in operands)
  sizes = _sizes("ragged")
  out = gmm_lib.gmm(lhs, rhs, sizes, tiling=TILING, backend=backend, interpret=True)
  assert_close(out, jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST),
         TOL[jnp.float32])
  # grad [M, N] @ rhs[g].T -> [M, K], as used by the backward pass.
  out_t = gmm_lib.gmm(grad, rhs, sizes, tiling=TILING, transpose_rhs=True, backend=backend,
                      interpret=True)
  assert_close(out_t, pallas_kernels.gmm_reference(grad, rhs, sizes, transpose_rhs=True),
         TOL[jnp.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_unaligned_shape_and_default_tiling(backend):
  # m, k, n not multiples of the tiles: operands are padded internally.
  rng = np.random.default_rng(1)
  lhs = jnp.asarray(rng.normal(size=(50, 20)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(3, 20, 24)), jnp.float32)
  sizes = jnp.asarray([7, 0, 40], jnp.int32)
  for tiling in (TILING, None):
    out = gmm_lib.gmm(lhs, rhs, sizes, tiling=tiling, backend=backend, interpret=True)
    assert_close(out, pallas_kernels.gmm_reference(lhs, rhs, sizes), TOL[jnp.float32])
  out = gmm_lib.gmm(lhs, rhs, sizes, tiling=TILING, preferred_element_type=jnp.bfloat16,
                    backend=backend, interpret=True)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_matches_reference_and_zeroes_empty_groups(operands, backend):
  lhs, _, grad = (jnp.asarray(x) for x in operands)
  for name in ("ragged", "empty_ends", "all_empty", "truncated"):
    sizes = _sizes(name)
    out = gmm_lib.tgmm(lhs, grad, sizes, tiling=TILING, backend=backend, interpret=True)
    assert out.shape == (G, K, N)
    assert_close(out, pallas_kernels.tgmm_reference(lhs, grad, sizes), TOL[jnp.float32])
    empty = np.asarray(GROUP_LAYOUTS[name]) == 0
    assert np.all(np.asarray(out)[empty] == 0.0), name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matmul_gradients_match_reference(operands, backend, dtype):
  lhs, rhs, grad = (jnp.asarray(x, dtype) for x in operands)

  def loss(fn):
    cotangent = grad.astype(jnp.float32)
    return lambda x, w, sizes: jnp.sum(fn(x, w, sizes).astype(jnp.float32) * cotangent)

  kernel = lambda x, w, s: pallas_kernels.grouped_matmul(x, w, s, tiling=TILING, backend=backend,
                                                         interpret=True)
  grad_fn = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))
  ref_fn = jax.grad(loss(pallas_kernels.gmm_reference), argnums=(0, 1))
  for name in ("ragged", "empty_ends", "tail_rows"):
    sizes = _sizes(name)
    d_lhs, d_rhs = grad_fn(lhs, rhs, sizes)
    r_lhs, r_rhs = ref_fn(lhs, rhs, sizes)
    assert d_lhs.dtype == dtype and d_rhs.dtype == dtype
    assert_close(d_lhs, r_lhs, GRAD_TOL[dtype])
    assert_close(d_rhs, r_rhs, GRAD_TOL[dtype])
    used = int(np.sum(GROUP_LAYOUTS[name]))
    assert np.all(np.asarray(d_lhs)[used:] == 0.0)


def test_metadata_gives_empty_groups_no_visits():
  # 4 rows per tile; groups: [0, 6, 0, 0, 5, 0] -> rows [0, 6) and [6, 11) of m = 16.
  offsets = gmm_lib.group_offsets(jnp.asarray([0, 6, 0, 0, 5, 0], jnp.int32), 16)
  visits = jax.jit(gmm_mosaic.gmm_visits, static_argnames=("tiles_m", "tm"))
  out_tile, lhs_tile, rhs_group, real, num_visits = visits(offsets, tiles_m=4, tm=4)
  n = int(num_visits)
  # Group 1 visits tiles 0, 1; group 4 visits tiles 1, 2; tile 3 (rows 12+) gets a zero visit.
  assert n == 5
  np.testing.assert_array_equal(out_tile[:n], [0, 1, 1, 2, 3])
  np.testing.assert_array_equal(rhs_group[:4], [1, 1, 4, 4])
  np.testing.assert_array_equal(real[:n], [1, 1, 1, 1, 0])
  assert int(lhs_tile[4]) == 2 and int(rhs_group[4]) == 4  # zero visit: no new DMA
  first, last = gmm_triton.tile_group_ranges(offsets, tiles_m=4, tm=4)
  np.testing.assert_array_equal(first, [1, 1, 4, 6])
  np.testing.assert_array_equal(last, [1, 4, 4, 5])  # tile 3: last < first, no groups
  tgmm_visits = jax.jit(gmm_mosaic.tgmm_visits, static_argnames=("tiles_m", "tm"))
  tile, group, num = tgmm_visits(offsets, tiles_m=4, tm=4)
  # tgmm: each empty group gets one zeroing visit, non-empty ones their tiles.
  assert int(num) == 2 + 2 + 4
  np.testing.assert_array_equal(group[:8], [0, 1, 1, 2, 3, 4, 4, 5])
