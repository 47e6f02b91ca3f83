"""Tests for ernie5_jax.ops.attention against a naive per-query softmax loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax.ops import attention as attention_ops
from ernie5_jax.ops import backend as backend_lib

BATCH, SEQ, HEAD_DIM = 2, 8, 8

# (segment_ids, group_ids) per mask kind; row 1 differs from row 0 to exercise batching.
MASKS = {
    "causal": ([[1] * 8, [1] * 8], [[0] * 8, [0] * 8]),
    "segments": ([[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 2, 2, 0]], [[0] * 8, [0] * 8]),
    "groups": ([[1] * 8, [1] * 8], [[0, 1, 1, 1, 0, 2, 2, 0], [3, 3, 0, 0, 4, 4, 4, 4]]),
    # Group id 1 appears in both segments of row 0: groups must not cross segments.
    "combined": ([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 2, 0]],
                 [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 5, 5, 0, 6, 6, 0]]),
}


def naive_allowed(seg, grp, i, j):
  return seg[i] == seg[j] and (j <= i or (grp[i] == grp[j] and grp[i] != 0))


def naive_attention(q, k, v, seg, grp):
  """Per (batch, head, query) loop: softmax over the allowed keys only."""
  batch, seq, heads, head_dim = q.shape
  groups = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      kv = h // groups
      for i in range(seq):
        keys = [j for j in range(seq) if naive_allowed(seg[b], grp[b], i, j)]
        logits = np.array([q[b, i, h] @ k[b, j, kv] for j in keys]) / np.sqrt(head_dim)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, i, h] = sum(pj * v[b, j, kv] for pj, j in zip(p, keys))
  return out


attention_jit = jax.jit(attention_ops.attention, static_argnames="backend")


@pytest.fixture(scope="module", params=[(4, 2), (4, 1), (2, 2)], ids=lambda p: f"H{p[0]}KV{p[1]}")
def qkv(request):
  heads, kv_heads = request.param
  rng = np.random.default_rng(heads * 10 + kv_heads)
  q = rng.normal(size=(BATCH, SEQ, heads, HEAD_DIM)).astype(np.float32)
  k = rng.normal(size=(BATCH, SEQ, kv_heads, HEAD_DIM)).astype(np.float32)
  v = rng.normal(size=(BATCH, SEQ, kv_heads, HEAD_DIM)).astype(np.float32)
  return q, k, v


@pytest.mark.parametrize("kind", list(MASKS))
def test_make_mask_matches_rule(kind):
  seg, grp = (np.array(a, np.int32) for a in MASKS[kind])
  mask = np.asarray(attention_ops.make_mask(jnp.asarray(seg), jnp.asarray(grp)))
  assert mask.shape == (BATCH, SEQ, SEQ) and mask.dtype == bool
  expected = np.array([[[naive_allowed(seg[b], grp[b], i, j) for j in range(SEQ)]
                        for i in range(SEQ)] for b in range(BATCH)])
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("kind", list(MASKS))
def test_attention_matches_naive(qkv, kind):
  q, k, v = qkv
  seg, grp = (np.array(a, np.int32) for a in MASKS[kind])
  out = attention_jit(q, k, v, segment_ids=seg, group_ids=grp)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, grp),
                             rtol=1e-5, atol=1e-5)


def test_pallas_backend_matches_naive(qkv):
  # Flash attention kernel in interpret mode (CPU), with every mask kind at once.
  q, k, v = qkv
  seg, grp = (np.array(a, np.int32) for a in MASKS["combined"])
  out = jax.jit(functools.partial(attention_ops.attention, backend="pallas"))(
      q, k, v, segment_ids=seg, group_ids=grp)
  np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, grp),
                             rtol=1e-5, atol=1e-5)


def test_auto_backend_per_platform():
  assert backend_lib.resolve_attention_backend("auto", platform="cpu") == "xla"
  assert backend_lib.resolve_attention_backend("auto", platform="gpu") == "pallas"
  assert backend_lib.resolve_attention_backend("auto", platform="tpu") == "pallas"
  assert backend_lib.resolve_attention_backend("xla", platform="tpu") == "xla"


def test_causal_mask_matches_lower_triangle():
  seg, grp = (np.array(a, np.int32) for a in MASKS["causal"])
  mask = np.asarray(attention_ops.make_mask(jnp.asarray(seg), jnp.asarray(grp)))
  np.testing.assert_array_equal(mask[0], np.tril(np.ones((SEQ, SEQ), bool)))


def test_bfloat16_keeps_dtype():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(BATCH, SEQ, h, HEAD_DIM)), jnp.bfloat16)
             for h in (4, 2, 2))
  seg, grp = (np.array(a, np.int32) for a in MASKS["combined"])
  out = attention_jit(q, k, v, segment_ids=seg, group_ids=grp)
  assert out.dtype == jnp.bfloat16
  ref = naive_attention(*(np.asarray(a, np.float32) for a in (q, k, v)), seg, grp)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=5e-2)


def test_errors_name_the_argument():
  q = jnp.zeros((1, 4, 3, 8))
  kv = jnp.zeros((1, 4, 2, 8))
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="kv_heads=2"):
    attention_ops.attention(q, kv, kv, segment_ids=ids, group_ids=ids)
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match=r"backend='cudnn' .*\('auto', 'xla', 'pallas'\)"):
    attention_ops.attention(q, kv, kv, segment_ids=ids, group_ids=ids, backend="cudnn")
  with pytest.raises(ValueError, match="group_ids.shape"):
    attention_ops.attention(q, kv, kv, segment_ids=ids, group_ids=ids[:, :2])


def _autodiff_attention(q, k, v, mask):
  """The plain formulation, differentiated by JAX: the reference for xla_attention's VJP."""
  groups = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # [B, S, H, D]
  logits = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vr)


def test_xla_attention_gradients_match_autodiff(qkv):
  # The hand-written backward (custom VJP) against autodiff of the plain formulation.
  q, k, v = qkv
  seg, grp = (jnp.asarray(a, jnp.int32) for a in MASKS["combined"])
  mask = attention_ops.make_mask(seg, grp)
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  loss = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cotangent),
                                     argnums=(0, 1, 2)))
  for name, got, want in zip("qkv", loss(attention_ops.xla_attention)(q, k, v),
                             loss(_autodiff_attention)(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5,
                               err_msg=f"d/d{name}")


def _long_masks():
  """Masks of the fewest blocked query blocks: (name, segment_ids, group_ids, blocked)."""
  block = attention_ops.QUERY_BLOCK
  seq = attention_ops.MIN_QUERY_BLOCKS * block
  segments = np.ones((2, seq), np.int32)
  segments[0, block + block // 2:] = 2  # row 0 packs two documents
  groups = np.zeros((2, seq), np.int32)
  inside = groups.copy()
  inside[1, 10:20] = 1  # a bidirectional group inside block 0
  crossing = groups.copy()
  crossing[1, 2 * block - 8:2 * block + 12] = 1  # block 1's last rows see keys past its end
  return [("causal", segments, groups, True), ("group_inside_block", segments, inside, True),
          ("group_crossing_block_end", segments, crossing, False)]


def test_blocked_self_attention_skips_only_what_the_mask_allows():
  # Query blocks read keys up to their own end when no row may see later keys; a group
  # that crosses a block end takes the one-block path. Both match autodiff of the plain
  # formulation (outputs and gradients).
  rng = np.random.default_rng(11)
  blocks = attention_ops.MIN_QUERY_BLOCKS
  seq = blocks * attention_ops.QUERY_BLOCK
  q = jnp.asarray(rng.normal(size=(2, seq, 2, HEAD_DIM)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, seq, 1, HEAD_DIM)), jnp.float32) for _ in "kv")
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  value_and_grad = lambda fn: jax.jit(jax.value_and_grad(
      lambda q, k, v, mask: jnp.sum(fn(q, k, v, mask) * cotangent), argnums=(0, 1, 2)))
  blocked, reference = value_and_grad(attention_ops.xla_attention), value_and_grad(
      _autodiff_attention)
  assert attention_ops._query_blocks(seq, seq) == blocks
  assert attention_ops._query_blocks(seq - attention_ops.QUERY_BLOCK,
                                     seq - attention_ops.QUERY_BLOCK) == 1  # too short
  assert attention_ops._query_blocks(seq, seq + 1) == 1  # cached decode: one block
  for name, seg, grp, within in _long_masks():
    mask = attention_ops.make_mask(jnp.asarray(seg), jnp.asarray(grp))
    assert bool(attention_ops._within_blocks(mask, blocks)) == within, name
    (got, got_grads), (want, want_grads) = blocked(q, k, v, mask), reference(q, k, v, mask)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=name)
    for axis, g, w in zip("qkv", got_grads, want_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5,
                                 err_msg=f"{name}: d/d{axis}")
