"""Tests for Uni-RoPE (ernie5_jax.model.rope) against 1-D RoPE and rotation matrices."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax.aot import hlo as hlo_lib
from ernie5_jax.model import rope

BATCH, SEQ, HEADS, HEAD_DIM, THETA = 2, 12, 3, 32, 10_000.0
SECTIONS = (8, 4, 4)


def rope_1d(x, index, theta=THETA):
  """Plain 1-D RoPE (Su et al. 2021), rotate-half layout; x [B, S, H, D], index [S]."""
  half = x.shape[-1] // 2
  freqs = 1.0 / theta ** (np.arange(half) * 2 / x.shape[-1])  # [D/2]
  ang = index[:, None] * freqs[None]  # [S, D/2]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def interleaved_axes(sections):
  """Axis of each pair: repeatedly take the axis whose next pair is furthest behind its share."""
  taken, axes = [0, 0, 0], []
  for _ in range(sum(sections)):
    # Next pair of axis a sits at fraction (taken[a] + 1/2) / n_a; take the smallest.
    axis = min((a for a in range(3) if taken[a] < sections[a]),
               key=lambda a: ((taken[a] + 0.5) / sections[a], a))
    taken[axis] += 1
    axes.append(axis)
  return axes


def rotation_matrix(pos_thw, head_dim, sections, theta=THETA):
  """[D, D] block rotation for one token: pair i = (i, i + D/2), angle pos[axis(i)] * f_i."""
  half = head_dim // 2
  r = np.zeros((head_dim, head_dim))
  axes = interleaved_axes(sections)
  for i in range(half):
    axis = axes[i]
    ang = pos_thw[axis] * theta ** (-2.0 * i / head_dim)
    c, s = np.cos(ang), np.sin(ang)
    r[i, i], r[i, i + half] = c, -s
    r[i + half, i], r[i + half, i + half] = s, c
  return r


@pytest.fixture(scope="module")
def x():
  return np.random.default_rng(0).normal(size=(BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32)


@functools.partial(jax.jit, static_argnames="sections")
def _uni_rope(x, positions, sections):
  angles = rope.rope_angles(positions, head_dim=HEAD_DIM, sections=sections, theta=THETA)
  return rope.apply_rope(x, angles)


def uni_rope(x, positions, sections=SECTIONS):
  return np.asarray(_uni_rope(jnp.asarray(x), jnp.asarray(positions), tuple(sections)))


def test_text_positions_reduce_to_1d_rope(x):
  positions = rope.text_positions(BATCH, SEQ)
  assert positions.shape == (BATCH, SEQ, 3) and positions.dtype == jnp.int32
  angles = rope.rope_angles(positions, head_dim=HEAD_DIM, sections=SECTIONS, theta=THETA)
  # Exactly the 1-D angles: every section reads the same index.
  expected = positions[..., :1].astype(jnp.float32) * rope.inverse_frequencies(HEAD_DIM, THETA)
  np.testing.assert_array_equal(np.asarray(angles), np.asarray(expected))
  np.testing.assert_allclose(uni_rope(x, positions), rope_1d(x, np.arange(SEQ)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sections", [SECTIONS, (16, 0, 0), (0, 6, 10)])
def test_arbitrary_positions_match_rotation_matrices(x, sections):
  positions = np.random.default_rng(1).integers(0, 40, size=(BATCH, SEQ, 3)).astype(np.int32)
  out = uni_rope(x, positions, sections)
  expected = np.zeros_like(out)
  for b in range(BATCH):
    for s in range(SEQ):
      r = rotation_matrix(positions[b, s], HEAD_DIM, sections)
      expected[b, s] = np.einsum("ij,hj->hi", r, x[b, s])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_axes_interleave_over_the_frequency_range():
  # (8, 4, 4): t at both ends, h and w spread over the whole range (not only the lowest).
  np.testing.assert_array_equal(rope.section_index((8, 4, 4)),
                                [0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0])
  index = rope.section_index((16, 8, 8))
  assert np.bincount(index).tolist() == [16, 8, 8]
  assert index[:4].tolist() == [0, 1, 2, 0]  # Every axis gets high frequencies too.


def test_t_only_section_ignores_h_and_w(x):
  positions = np.random.default_rng(2).integers(0, 40, size=(BATCH, SEQ, 3)).astype(np.int32)
  moved = positions.copy()
  moved[..., 1:] += 7
  np.testing.assert_array_equal(uni_rope(x, positions, (16, 0, 0)),
                                uni_rope(x, moved, (16, 0, 0)))


def test_scores_depend_on_relative_position(x):
  """<R(m) q, R(n) k> == <R(m + c) q, R(n + c) k> for every axis shift c."""
  q, k = x[:1, :1], x[1:, :1]  # [1, 1, H, D]
  pos = lambda p: np.array(p, np.int32).reshape(1, 1, 3)
  score = lambda pq, pk: np.sum(uni_rope(q, pos(pq)) * uni_rope(k, pos(pk)), axis=-1)
  base = score((3, 5, 2), (1, 0, 4))
  np.testing.assert_allclose(score((13, 9, 8), (11, 4, 10)), base, rtol=1e-4, atol=1e-4)


def test_rotation_preserves_norm(x):
  positions = np.random.default_rng(3).integers(0, 100, size=(BATCH, SEQ, 3)).astype(np.int32)
  np.testing.assert_allclose(np.linalg.norm(uni_rope(x, positions), axis=-1),
                             np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rotation_table_is_evaluated_once_per_pair(x):
  """The compiled rotation of q and k (and its gradient) evaluates cos and sin in fusions
  whose outputs are [batch, seq, pairs]-sized, not inside each per-head consumer."""
  positions = jnp.asarray(np.random.default_rng(4).integers(0, 99, size=(BATCH, SEQ, 3)),
                          jnp.int32)

  def rotate(q, k, positions):
    angles = rope.rope_angles(positions, head_dim=HEAD_DIM, sections=SECTIONS, theta=THETA)
    return jnp.sum(rope.apply_rope(q, angles) * rope.apply_rope(k, angles))

  hlo = jax.jit(jax.value_and_grad(rotate, argnums=(0, 1))).lower(
      jnp.asarray(x), jnp.asarray(x), positions).compile().as_text()
  sizes = []  # output sizes of every computation that evaluates a cosine or sine
  for lines in hlo_lib.computations(hlo)[0].values():
    if any(re.search(r" (?:cosine|sine)\(", line) for line in lines):
      root = next(re.search(r"ROOT %\S+ = (\S+)", line) for line in lines if "ROOT" in line)
      sizes += [int(np.prod([int(d) for d in dims.split(",")]))
                for dims in re.findall(r"f32\[([\d,]+)\]", root.group(1))]
  assert sizes and max(sizes) == BATCH * SEQ * HEAD_DIM, sizes  # the [cos | sin] table


def test_bad_sections_raise():
  positions = rope.text_positions(1, 4)
  with pytest.raises(ValueError, match="sections=\\(8, 4, 3\\)"):
    rope.rope_angles(positions, head_dim=HEAD_DIM, sections=(8, 4, 3), theta=THETA)
  with pytest.raises(ValueError, match="positions.shape"):
    rope.rope_angles(positions[..., :2], head_dim=HEAD_DIM, sections=SECTIONS, theta=THETA)
