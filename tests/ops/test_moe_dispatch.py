"""expert_ffn backends vs a naive per-token reference: outputs, gradients, drop rule, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax.config import MOE_DISPATCH_BACKENDS
from ernie5_jax.ops import moe_windows
from ernie5_jax.ops.backend import resolve_moe_backend
from ernie5_jax.ops.moe_dispatch import expert_ffn

T, D, F, E, K = 32, 16, 8, 8, 2  # mean load 8: windows of 8 rows
BACKENDS = ("gather", "ragged_dot", "capacity")  # "pallas" (interpret mode): its own test below


def reference_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down):
  """Naive reference: no sorting or grouping; for each slot k every token applies its own
  expert's weights, gathered per token."""
  y = jnp.zeros_like(x)
  for k in range(expert_ids.shape[1]):
    e = expert_ids[:, k]  # [tokens]
    h = (jax.nn.silu(jnp.einsum("td,tdf->tf", x, w_gate[e]))
         * jnp.einsum("td,tdf->tf", x, w_up[e]))  # [tokens, hidden]
    y = y + combine_weights[:, k:k + 1] * jnp.einsum("tf,tfd->td", h, w_down[e])
  return y


def _routings():
  rng = np.random.default_rng(0)
  random = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(T)])  # expert E-1 empty
  skewed = np.stack([np.zeros(T, int), rng.integers(1, 4, T)], 1)  # expert 0 on every token
  return {
      "balanced": np.stack([np.arange(T) * K % E, (np.arange(T) * K + 1) % E], 1),  # load 8 each
      "random_with_empty_expert": random,
      "skewed": skewed,
      "worst_case_same_k_experts": np.tile(np.arange(K)[::-1], (T, 1)),  # load T on k experts
  }


ROUTINGS = _routings()


@pytest.fixture(scope="module")
def params():
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (T, D))
  w_gate = jax.random.normal(keys[1], (E, D, F)) / math.sqrt(D)
  w_up = jax.random.normal(keys[2], (E, D, F)) / math.sqrt(D)
  w_down = jax.random.normal(keys[3], (E, F, D)) / math.sqrt(F)
  combine_weights = jax.random.uniform(keys[4], (T, K), minval=0.1)
  cotangent = jax.random.normal(keys[5], (T, D))
  return x, combine_weights, w_gate, w_up, w_down, cotangent


def _loss(ffn, **kwargs):
  def loss(x, expert_ids, combine_weights, w_gate, w_up, w_down, cotangent):
    y = ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, **kwargs)
    return jnp.sum(y * cotangent), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4, 5), has_aux=True))


@pytest.fixture(scope="module")
def reference():
  return _loss(reference_ffn)


@pytest.fixture(scope="module")
def backend_fns():
  # capacity_factor 4 = capacity 32 = T: nothing can be dropped, so it must match too.
  return {b: _loss(expert_ffn, backend=b, capacity_factor=4.0) for b in BACKENDS}


def _assert_close(actual, expected, what):
  scale = float(jnp.max(jnp.abs(expected))) + 1e-6
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=2e-5 * scale,
                             rtol=2e-5, err_msg=what)


def _assert_matches_reference(fn, reference, args, what):
  """fn's output and gradients (a _loss function) equal the reference's on args."""
  (_, y), grads = fn(*args)
  (_, y_ref), grads_ref = reference(*args)
  _assert_close(y, y_ref, f"{what}: y")
  for name, g, g_ref in zip(("x", "combine_weights", "w_gate", "w_up", "w_down"), grads, grads_ref):
    _assert_close(g, g_ref, f"{what}: d/d{name}")


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_outputs_and_gradients(params, reference, backend_fns, backend, routing):
  x, combine_weights, w_gate, w_up, w_down, cotangent = params
  expert_ids = jnp.asarray(ROUTINGS[routing], jnp.int32)
  args = (x, expert_ids, combine_weights, w_gate, w_up, w_down, cotangent)
  _assert_matches_reference(backend_fns[backend], reference, args, f"{backend}/{routing}")


def test_pallas_backend_matches_reference(params, reference):
  # The grouped-matmul kernel in interpret mode (CPU), on a routing with an empty expert
  # and one with every token on the same k experts.
  pallas_fn = _loss(expert_ffn, backend="pallas")
  for routing in ("random_with_empty_expert", "worst_case_same_k_experts"):
    args = (params[0], jnp.asarray(ROUTINGS[routing], jnp.int32)) + params[1:]
    _assert_matches_reference(pallas_fn, reference, args, f"pallas/{routing}")


@pytest.mark.parametrize("rows", [8, 2])
@pytest.mark.parametrize("capacity", [None, 5])
def test_layout_windows_cover_each_kept_assignment_once(rows, capacity):
  # rows=8 is window_rows(64, 8) (a quarter of the mean load 8, rounded up to 8); rows=2
  # cuts the worst case's 32-row experts into 16 tiles: one window of 8 tiles, twice.
  assert moe_windows.window_rows(T * K, E) == 8
  for name, ids in ROUTINGS.items():
    asg = moe_windows.sort_assignments(jnp.asarray(ids, jnp.int32), E)
    lay = moe_windows.layout(asg, rows, capacity)
    num_rows = lay.source.shape[0]
    assert num_rows == moe_windows.layout_rows(T * K, E, rows)
    counts = np.bincount(ids.reshape(-1), minlength=E)
    kept_counts = counts if capacity is None else np.minimum(counts, capacity)
    flat = ids.reshape(-1)
    row, source = np.asarray(lay.row), np.asarray(lay.source)
    kept = np.asarray(asg.rank) < kept_counts[flat]
    assert (row[~kept] == num_rows).all(), name  # dropped: no row
    np.testing.assert_array_equal(source[row[kept]], np.flatnonzero(kept), err_msg=name)
    assert (source < T * K).sum() == kept.sum(), name  # every other row is padding
    covered = np.zeros(num_rows, int)
    sizes = [w[0] for w in lay.windows]
    assert sizes == [s for s in moe_windows.WINDOW_TILES if s * rows <= num_rows], name
    for size, expert, start, num in lay.windows:
      tiles = -(-kept_counts // rows)
      largest = size == sizes[0]
      expected = tiles // size if largest else (tiles % (2 * size)) // size
      assert int(num) == expected.sum(), (name, size)
      for i in range(int(num)):
        e, s = int(expert[i]), int(start[i])
        covered[s:s + size * rows] += 1
        held = source[s:s + size * rows]
        assert (flat[held[held < T * K]] == e).all(), (name, size)  # one expert per window
    assert (covered <= 1).all(), name
    assert (covered[row[kept]] == 1).all(), name


def test_every_window_size_matches_reference(params, reference):
  # Tiles of 2 rows: loads 8 / 32 run windows of 4 / 8 + 8 tiles, random loads mix sizes.
  def ffn(x, ids, cw, wg, wu, wd):
    asg = moe_windows.sort_assignments(ids, E)
    return moe_windows.routed_swiglu(2, None, x, cw.reshape(-1), asg, wg, wu, wd)
  small_tiles = _loss(ffn)
  for routing in ("random_with_empty_expert", "worst_case_same_k_experts"):
    args = (params[0], jnp.asarray(ROUTINGS[routing], jnp.int32)) + params[1:]
    _assert_matches_reference(small_tiles, reference, args, routing)


def _drop_rule(expert_ids, capacity):
  """numpy: keep an assignment iff its expert holds < capacity earlier ones (token order)."""
  taken = np.zeros(E, int)
  keep = np.zeros(expert_ids.shape, bool)
  for t, k in np.ndindex(*expert_ids.shape):
    e = expert_ids[t, k]
    keep[t, k] = taken[e] < capacity
    taken[e] += keep[t, k]
  return keep


def test_capacity_drops_exactly_the_assignments_past_capacity(params, reference):
  x, combine_weights, w_gate, w_up, w_down, cotangent = params
  ids = ROUTINGS["skewed"]
  capacity = math.ceil(1.0 * T * K / E)  # capacity_factor=1 -> 8 rows per expert
  keep = _drop_rule(ids, capacity)
  assert 0 < (~keep).sum() < keep.size
  capacity_fn = _loss(expert_ffn, backend="capacity", capacity_factor=1.0)
  args = (x, jnp.asarray(ids, jnp.int32), combine_weights, w_gate, w_up, w_down, cotangent)
  (_, y), grads = capacity_fn(*args)
  masked = args[:2] + (combine_weights * keep,) + args[3:]
  (_, y_ref), grads_ref = reference(*masked)
  _assert_close(y, y_ref, "capacity: y")
  grads_ref = (grads_ref[0], grads_ref[1] * keep) + grads_ref[2:]  # dropped weights: zero grad
  for name, g, g_ref in zip(("x", "combine_weights", "w_gate", "w_up", "w_down"), grads, grads_ref):
    _assert_close(g, g_ref, f"capacity: d/d{name}")


def test_auto_resolves_per_platform(params):
  assert resolve_moe_backend("auto", platform="cpu") == "gather"
  assert resolve_moe_backend("auto", platform="gpu") == "pallas"
  assert resolve_moe_backend("auto", platform="tpu") == "pallas"
  for name in MOE_DISPATCH_BACKENDS[1:]:
    assert resolve_moe_backend(name, platform="tpu") == name
  expected = "gather" if jax.default_backend() == "cpu" else "pallas"
  assert resolve_moe_backend("auto") == expected


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_forward_and_backward_lower_for_accelerators(params, platform):
  # "auto" picks the Pallas kernels there (their lowering is tested in
  # tests/pallas_kernels); the XLA backends must still lower (e.g. to compare).
  x, combine_weights, w_gate, w_up, w_down, _ = params
  ids = jnp.asarray(ROUTINGS["skewed"], jnp.int32)
  for backend in BACKENDS:
    loss = lambda *a: jnp.sum(expert_ffn(a[0], ids, *a[1:], backend=backend) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    exported = jax.export.export(grad, platforms=[platform])(
        x, combine_weights, w_gate, w_up, w_down)
    assert exported.platforms == (platform,), backend
    assert [a.shape for a in exported.out_avals] == [
        a.shape for a in (x, combine_weights, w_gate, w_up, w_down)], backend


def test_bfloat16_activations(params):
  x, combine_weights, w_gate, w_up, w_down, _ = params
  ids = jnp.asarray(ROUTINGS["random_with_empty_expert"], jnp.int32)
  y = expert_ffn(x.astype(jnp.bfloat16), ids, combine_weights, w_gate, w_up, w_down,
                 backend="gather")
  assert y.dtype == jnp.bfloat16
  y_ref = reference_ffn(x, ids, combine_weights, w_gate, w_up, w_down)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("change, match", [
    (dict(backend="megablox"), r"backend='megablox' .*expected one of \('auto', 'gather'"),
    (dict(combine_weights=jnp.ones((T, K + 1))), r"combine_weights.shape=\(32, 3\).*expert_ids"),
    (dict(expert_ids=jnp.zeros((T - 1, K), jnp.int32)), r"expert_ids.shape=\(31, 2\)"),
    (dict(expert_ids=jnp.zeros((T, K))), r"expert_ids.dtype=float32.*integer"),
    (dict(x=jnp.zeros((2, T, D))), r"x.shape=\(2, 32, 16\).*\[tokens, d_model\]"),
    (dict(w_gate=jnp.zeros((E, D + 1, F))), r"w_gate.shape=\(8, 17, 8\).*d_model=16"),
    (dict(w_gate=jnp.zeros((E + 1, D, F))), r"w_gate.shape=\(9, 16, 8\).*num_experts=8 like w_up"),
    (dict(w_up=jnp.zeros((E + 1, D, F))), r"w_up.shape=\(9, 16, 8\).*w_gate.shape=\(8, 16, 8\)"),
    (dict(w_down=jnp.zeros((E - 1, F, D))), r"w_down.shape=\(7, 8, 16\).*num_experts=8"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 .*> 0"),
])
def test_bad_arguments_raise_value_error_naming_them(params, change, match):
  x, combine_weights, w_gate, w_up, w_down, _ = params
  kwargs = dict(x=x, expert_ids=jnp.zeros((T, K), jnp.int32), combine_weights=combine_weights,
                w_gate=w_gate, w_up=w_up, w_down=w_down)
  kwargs.update(change)
  with pytest.raises(ValueError, match=match):
    expert_ffn(**kwargs)


@pytest.mark.parametrize("backend", ["gather", "ragged_dot"])
def test_expert_id_e_is_no_expert(params, reference, backend_fns, backend):
  # The ragged expert-parallel exchange marks its unused buffer tail with id E, weight 0:
  # those rows give 0 and no gradient; the others are unchanged.
  x, combine_weights, w_gate, w_up, w_down, cotangent = params
  real = jnp.arange(T)[:, None] < T - 8
  ids = jnp.asarray(ROUTINGS["random_with_empty_expert"], jnp.int32)
  weights = jnp.where(real, combine_weights, 0.0)
  (_, y), grads = backend_fns[backend](x, jnp.where(real, ids, E), weights, w_gate, w_up,
                                       w_down, cotangent)
  (_, y_ref), grads_ref = reference(x, jnp.where(real, ids, 0), weights, w_gate, w_up, w_down,
                                    cotangent)
  _assert_close(y, y_ref, f"{backend}: y")
  assert float(jnp.max(jnp.abs(y[T - 8:]))) == 0.0
  for name, g, g_ref in zip(("x", "w_gate", "w_up", "w_down"), grads[:1] + grads[2:],
                            grads_ref[:1] + grads_ref[2:]):
    _assert_close(g, g_ref, f"{backend}: d/d{name}")
