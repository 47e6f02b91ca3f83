"""Block summaries of the attention mask: sound (never skip an allowed entry) and useful."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_mask as am

BQ, BK = 8, 4


def _dense_blocks(seg, grp):
  """[B, nq, nk] (any allowed, all allowed) from the dense mask."""
  mask = np.asarray(am.dense_mask(jnp.asarray(seg), jnp.asarray(grp)))  # [B, S, S]
  b, s, _ = mask.shape
  blocks = mask.reshape(b, s // BQ, BQ, s // BK, BK)
  return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


def _layouts():
  rng = np.random.default_rng(0)
  s = 32
  seg = np.zeros((2, s), np.int32)
  seg[0, 10:], seg[0, 21:] = 1, 2
  seg[1, 16:] = 5
  grp = np.zeros((2, s), np.int32)
  grp[0, 2:9], grp[0, 12:20] = 1, 2
  grp[1, 16:32] = 9
  return {
      "packed_groups": (seg, grp),
      "causal": (np.zeros((2, s), np.int32), np.zeros((2, s), np.int32)),
      "random": (rng.integers(0, 3, (2, s)).astype(np.int32),
                 rng.integers(0, 4, (2, s)).astype(np.int32)),
  }


@pytest.mark.parametrize("name", list(_layouts()))
def test_block_kinds_are_sound(name):
  seg, grp = _layouts()[name]
  kinds = np.asarray(am.block_kinds(jnp.asarray(seg), jnp.asarray(grp), BQ, BK))
  any_allowed, all_allowed = _dense_blocks(seg, grp)
  assert np.all(any_allowed[kinds == am.BLOCK_SKIP] == False)  # noqa: E712
  assert np.all(all_allowed[kinds == am.BLOCK_FULL])


def test_block_kinds_skip_the_masked_blocks_of_a_packed_layout():
  seg, grp = _layouts()["packed_groups"]
  kinds = np.asarray(am.block_kinds(jnp.asarray(seg), jnp.asarray(grp), BQ, BK))
  any_allowed, all_allowed = _dense_blocks(seg, grp)
  # With contiguous segments and groups the min/max summaries are exact.
  np.testing.assert_array_equal(kinds != am.BLOCK_SKIP, any_allowed)
  assert (kinds == am.BLOCK_SKIP).mean() > 0.5
  assert np.any(kinds == am.BLOCK_FULL)
  # Plain causal: exactly the blocks strictly above the diagonal are skipped.
  seg, grp = _layouts()["causal"]
  kinds = np.asarray(am.block_kinds(jnp.asarray(seg), jnp.asarray(grp), BQ, BK))[0]
  q_last = np.arange(4)[:, None] * BQ + BQ - 1
  k_first = np.arange(8)[None, :] * BK
  np.testing.assert_array_equal(kinds == am.BLOCK_SKIP, k_first > q_last)


def test_fetch_blocks_and_active_range():
  kinds = jnp.asarray([[0, 1, 0, 0, 2, 0], [0, 0, 0, 0, 0, 1]], jnp.int32)
  # Skipped steps re-name the previous active block (or the next one at the start).
  np.testing.assert_array_equal(am.fetch_blocks(kinds), [[1, 1, 1, 1, 4, 4], [5, 5, 5, 5, 5, 5]])
  lo, hi = am.active_range(kinds)
  np.testing.assert_array_equal(lo, [1, 5])
  np.testing.assert_array_equal(hi, [5, 6])


def test_padding_hides_padded_keys():
  seg = jnp.asarray([[0, 0, 1, 1, 1]], jnp.int32)
  grp = jnp.asarray([[0, 0, 2, 2, 2]], jnp.int32)
  seg_p, grp_p = am.pad_ids(seg, grp, 8)
  mask = np.asarray(am.dense_mask(seg_p, grp_p))[0]
  assert not mask[:5, 5:].any()  # real queries never see padded keys
  assert mask[5:].any(axis=1).all()  # padded queries see something (finite softmax)
  np.testing.assert_array_equal(mask[:5, :5], np.asarray(am.dense_mask(seg, grp))[0])
