"""Flash attention kernels (Mosaic and Triton bodies, interpret mode) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import attention

BACKENDS = ("mosaic", "triton")
# Odd length (padded internally), blocks of 8 / 16 so several block pairs are
# skipped, partial and full; backward blocks differ from the forward ones.
B, S, H, KV, D = 2, 37, 4, 2, 16
BLOCKS = pallas_kernels.BlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=8)
# max |kernel - reference| <= ATOL + RTOL * max |reference|, per dtype. float32 is
# exact up to summation order; bfloat16 kernels round probabilities to bf16
# before the PV / dV matmuls and the outputs to 8 mantissa bits.
# (Measured worst cases: bf16 forward 3.3e-3, gradients 7.2e-3 relative.)
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (0.0, 1e-2)}
GRAD_TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (0.0, 2e-2)}


def assert_close(actual, expected, tol, what=""):
  atol, rtol = tol
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  err = np.abs(actual - expected).max()
  assert err <= atol + rtol * max(np.abs(expected).max(), 1e-6), f"{what}: max error {err}"


def _masks():
  """name -> (segment_ids, group_ids) [B, S] int32, every mask kind the kernels support."""
  zeros = np.zeros((B, S), np.int32)
  segments = np.zeros((B, S), np.int32)
  segments[0, 13:28], segments[0, 28:] = 1, 2  # three packed documents
  segments[1, 20:] = 7
  groups = np.zeros((B, S), np.int32)
  groups[0, 2:11] = 1  # a 9-token image scale: bidirectional inside itself
  groups[0, 15:31] = 2  # spans a segment boundary (split by the segment rule)
  groups[1, 5:9], groups[1, 9:25] = 3, 4  # adjacent groups
  rng = np.random.default_rng(5)
  return {
      "causal": (zeros, zeros),
      "segments": (segments, zeros),
      "groups": (zeros, groups),
      "segments_and_groups": (segments, groups),
      "bidirectional": (zeros, np.ones((B, S), np.int32)),
      # Arbitrary, non-contiguous ids: the exact rule must still hold.
      "scattered_ids": (rng.integers(0, 2, (B, S)).astype(np.int32),
                        rng.integers(0, 3, (B, S)).astype(np.int32)),
  }


MASKS = _masks()


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, S, H, D)).astype(np.float32)
  k = rng.normal(size=(B, S, KV, D)).astype(np.float32)
  v = rng.normal(size=(B, S, KV, D)).astype(np.float32)
  cotangent = rng.normal(size=(B, S, H, D)).astype(np.float32)
  return q, k, v, cotangent


def _as(dtype, *arrays):
  return tuple(jnp.asarray(x, dtype) for x in arrays)


def _ids(name):
  seg, grp = MASKS[name]
  return jnp.asarray(seg), jnp.asarray(grp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference_for_every_mask(inputs, backend, dtype):
  q, k, v = _as(dtype, *inputs[:3])
  fn = jax.jit(lambda q, k, v, seg, grp: pallas_kernels.flash_attention(
      q, k, v, seg, grp, block_sizes=BLOCKS, backend=backend, interpret=True))
  for name in MASKS:
    seg, grp = _ids(name)
    out = fn(q, k, v, seg, grp)
    assert out.shape == (B, S, H, D) and out.dtype == dtype
    assert_close(out, pallas_kernels.attention_reference(q, k, v, seg, grp), TOL[dtype], name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_for_every_mask(inputs, backend, dtype):
  q, k, v, cot = _as(dtype, *inputs)

  def loss(fn):
    return lambda q, k, v, seg, grp: jnp.sum(
        fn(q, k, v, seg, grp).astype(jnp.float32) * cot.astype(jnp.float32))

  kernel = lambda q, k, v, seg, grp: pallas_kernels.flash_attention(
      q, k, v, seg, grp, block_sizes=BLOCKS, backend=backend, interpret=True)
  grad_fn = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))
  ref_fn = jax.jit(jax.grad(loss(pallas_kernels.attention_reference), argnums=(0, 1, 2)))
  for name in MASKS:
    seg, grp = _ids(name)
    grads, ref_grads = grad_fn(q, k, v, seg, grp), ref_fn(q, k, v, seg, grp)
    for arg, g, r in zip("qkv", grads, ref_grads):
      assert g.dtype == dtype
      assert_close(g, r, GRAD_TOL[dtype], f"{name} d{arg}")


@pytest.mark.parametrize("backend,num_kv,head_dim", [
    ("mosaic", 1, 128),  # multi-query; D % 128 == 0 takes the folded-heads layout
    ("triton", 4, 24),  # multi-head; D = 24 is padded to 32 for Triton
])
def test_head_layouts_and_kv_sharing(backend, num_kv, head_dim):
  rng = np.random.default_rng(2)
  b, s, h = 1, 20, 4
  q = jnp.asarray(rng.normal(size=(b, s, h, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, s, num_kv, head_dim)), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[0] * 12 + [1] * 8], jnp.int32)
  grp = jnp.asarray([[0] * 4 + [3] * 6 + [0] * 10], jnp.int32)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  kernel = lambda q, k, v: pallas_kernels.flash_attention(
      q, k, v, seg, grp, block_sizes=BLOCKS, backend=backend, interpret=True)
  reference = lambda q, k, v: pallas_kernels.attention_reference(q, k, v, seg, grp)
  def out_and_grads(fn):
    def run(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(cot)
    return jax.jit(run)

  out, grads = out_and_grads(kernel)(q, k, v)
  ref_out, ref_grads = out_and_grads(reference)(q, k, v)
  assert_close(out, ref_out, TOL[jnp.float32], "out")
  for arg, g, r in zip("qkv", grads, ref_grads):
    assert_close(g, r, GRAD_TOL[jnp.float32], f"d{arg}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_missing_ids_and_lse(inputs, backend):
  # Default (large) blocks shrink to the 37-token sequence; missing ids = causal.
  q, k, v = _as(jnp.float32, *inputs[:3])
  out, lse = attention.flash_attention_fwd(q, k, v, backend=backend, interpret=True)
  assert_close(out, pallas_kernels.attention_reference(q, k, v), TOL[jnp.float32], "out")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, H // KV, axis=2),
                      precision=jax.lax.Precision.HIGHEST) / np.sqrt(D)
  logits = jnp.where(jnp.tril(jnp.ones((S, S), bool)), logits, -jnp.inf)
  assert_close(lse, jax.nn.logsumexp(logits, axis=-1), TOL[jnp.float32], "lse")
  assert lse.shape == (B, H, S) and lse.dtype == jnp.float32
