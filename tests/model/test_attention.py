"""Tests for the Attention module (ernie5_jax.model.attention) against a numpy pipeline.

(Named *_layer so it does not clash with tests/ops/test_attention.py in pytest's rootdir
import mode.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie5_jax.model import rope
from ernie5_jax.model.attention import Attention

BATCH, SEQ, D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 32, 4, 2, 8
SECTIONS, THETA = (2, 1, 1), 10_000.0


def np_rope(x, positions):
  """Uni-RoPE in numpy: pair i uses axis t / h / w (interleaved), rotate-half layout."""
  half = HEAD_DIM // 2
  axis = np.array([0, 1, 2, 0])  # [D/2]: (2, 1, 1) interleaved as t h w t (test_rope.py).
  freqs = THETA ** (-np.arange(half) * 2.0 / HEAD_DIM)
  ang = positions[..., axis] * freqs  # [B, S, D/2]
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(q, k, v, seg, grp):
  groups = q.shape[2] // k.shape[2]
  out = np.zeros_like(q)
  for b in range(BATCH):
    for i in range(SEQ):
      same_group = (grp[b] == grp[b, i]) & (grp[b, i] != 0)
      allowed = (seg[b] == seg[b, i]) & ((np.arange(SEQ) <= i) | same_group)
      for h in range(q.shape[2]):
        logits = k[b, :, h // groups] @ q[b, i, h] / np.sqrt(HEAD_DIM)
        logits = np.where(allowed, logits, -np.inf)
        p = np.exp(logits - logits.max())
        out[b, i, h] = (p / p.sum()) @ v[b, :, h // groups]
  return out


def test_attention_module_matches_numpy():
  attn = Attention(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                   dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, SEQ, D_MODEL)).astype(np.float32)
  positions = rng.integers(0, 10, size=(BATCH, SEQ, 3)).astype(np.int32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2], [1] * 8], np.int32)
  grp = np.array([[0, 1, 1, 0, 0, 3, 3, 0], [0, 0, 2, 2, 2, 0, 0, 0]], np.int32)

  @nnx.jit
  def run(attn, x, positions, seg, grp):
    angles = rope.rope_angles(positions, head_dim=HEAD_DIM, sections=SECTIONS, theta=THETA)
    return attn(x, angles, seg, grp)[0]  # (out, cache): no cache here
  out = run(attn, x, positions, seg, grp)

  w = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in ("wq", "wk", "wv", "wo")}
  xd = x.astype(np.float64)
  q = np_rope(np.einsum("bsd,dhk->bshk", xd, w["wq"]), positions)
  k = np_rope(np.einsum("bsd,dhk->bshk", xd, w["wk"]), positions)
  v = np.einsum("bsd,dhk->bshk", xd, w["wv"])
  expected = np.einsum("bshk,hkd->bsd", np_attention(q, k, v, seg, grp), w["wo"])
  assert out.shape == (BATCH, SEQ, D_MODEL)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
  names = {n: getattr(attn, n).get_metadata()["out_sharding"] for n in ("wq", "wk", "wo")}
  assert names == {"wq": ("embed", "q_heads", "head_dim"),
                   "wk": ("embed", "kv_heads", "head_dim"),
                   "wo": ("q_heads", "head_dim", "embed")}
