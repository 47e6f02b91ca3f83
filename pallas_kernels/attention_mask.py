"""The attention mask rule, and the per-block summaries that let kernels skip work.

Rule (causal + packing + bidirectional groups), for query i and key j:

  allowed(i, j) = seg[i] == seg[j] and (j <= i or (grp[i] == grp[j] and grp[i] != 0))

with segment_ids / group_ids [B, S] int32 (group 0 = no group: plain causal).
The kernels never build an [S, S] mask: they evaluate the rule on the id
vectors of one (query block, key block) pair, and only for pairs whose block
summary says some entry may be allowed.

Block summaries are computed up front from per-block min/max of the ids
(cheap: [B, S / block] values), conservatively: a block pair is skipped only
if no entry can be allowed, and marked "full" only if every entry is.
Padding (to a block multiple) uses the last segment id and group 0, so padded
keys are never visible to real queries (j > i and group 0) while padded
queries still see at least one key (no empty softmax row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_SKIP = 0  # No entry allowed: not computed, not even fetched.
BLOCK_PARTIAL = 1  # Some entries allowed: computed with the rule applied.
BLOCK_FULL = 2  # All entries allowed: computed without evaluating the rule.

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def allowed(q_seg, q_grp, q_pos, k_seg, k_grp, k_pos):
  """The mask rule on broadcastable id / position arrays (e.g. [bq, 1] vs [1, bk])."""
  same_group = (q_grp == k_grp) & (q_grp != 0)
  return (q_seg == k_seg) & ((k_pos <= q_pos) | same_group)


def dense_mask(segment_ids: jax.Array, group_ids: jax.Array) -> jax.Array:
  """[B, S, S] bool mask (query, key): for the reference implementation only."""
  pos = jnp.arange(segment_ids.shape[1])
  return allowed(segment_ids[:, :, None], group_ids[:, :, None], pos[None, :, None],
                 segment_ids[:, None, :], group_ids[:, None, :], pos[None, None, :])


def pad_ids(segment_ids: jax.Array, group_ids: jax.Array,
            padded_len: int) -> tuple[jax.Array, jax.Array]:
  """Pads [B, S] ids to [B, padded_len]: segment ids repeat the last one, groups get 0."""
  extra = padded_len - segment_ids.shape[1]
  if extra == 0:
    return segment_ids, group_ids
  return (jnp.pad(segment_ids, ((0, 0), (0, extra)), mode="edge"),
          jnp.pad(group_ids, ((0, 0), (0, extra))))


def _block_stats(ids: jax.Array, block: int, *,
                 nonzero: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-block (min, max) of [B, S] ids -> two [B, S / block]; `nonzero` ignores zeros."""
  blocks = ids.reshape(ids.shape[0], -1, block)  # [B, n, block]
  if not nonzero:
    return blocks.min(-1), blocks.max(-1)
  return (jnp.where(blocks != 0, blocks, _INT_MAX).min(-1),
          jnp.where(blocks != 0, blocks, _INT_MIN).max(-1))


def block_kinds(segment_ids: jax.Array, group_ids: jax.Array, block_q: int,
                block_k: int) -> jax.Array:
  """[B, nq, nk] int32 BLOCK_SKIP / BLOCK_PARTIAL / BLOCK_FULL for padded [B, S] ids.

  Skip unless (segment ranges of the two blocks intersect) and (some key is
  at or before some query, or the two blocks' non-zero group ranges
  intersect). Full if both blocks hold one single segment and either every
  key precedes every query or both blocks lie in one single non-zero group.
  """
  seq_len = segment_ids.shape[1]
  nq, nk = seq_len // block_q, seq_len // block_k
  qs_min, qs_max = (x[:, :, None] for x in _block_stats(segment_ids, block_q))  # [B, nq, 1]
  ks_min, ks_max = (x[:, None, :] for x in _block_stats(segment_ids, block_k))  # [B, 1, nk]
  qg_min, qg_max = (x[:, :, None] for x in _block_stats(group_ids, block_q))
  kg_min, kg_max = (x[:, None, :] for x in _block_stats(group_ids, block_k))
  qn_min, qn_max = (x[:, :, None] for x in _block_stats(group_ids, block_q, nonzero=True))
  kn_min, kn_max = (x[:, None, :] for x in _block_stats(group_ids, block_k, nonzero=True))
  q_first = (jnp.arange(nq) * block_q)[None, :, None]  # first query position of the block
  q_last = q_first + block_q - 1
  k_first = (jnp.arange(nk) * block_k)[None, None, :]
  k_last = k_first + block_k - 1

  segments_meet = (qs_min <= ks_max) & (ks_min <= qs_max)
  groups_meet = (qn_min <= kn_max) & (kn_min <= qn_max)  # empty ranges never meet
  any_allowed = segments_meet & ((k_first <= q_last) | groups_meet)

  one_segment = (qs_min == qs_max) & (ks_min == ks_max) & (qs_min == ks_min)
  one_group = (qg_min == qg_max) & (kg_min == kg_max) & (qg_min == kg_min) & (qg_min != 0)
  all_allowed = one_segment & ((k_last <= q_first) | one_group)

  kinds = jnp.where(any_allowed, BLOCK_PARTIAL, BLOCK_SKIP)
  return jnp.where(all_allowed, BLOCK_FULL, kinds).astype(jnp.int32)


def fetch_blocks(kinds: jax.Array) -> jax.Array:
  """[..., n] int32: the block each grid step should DMA along the last axis.

  An active step fetches its own block. A skipped step re-names the previous
  active block (or the next one when none precedes it), so the pipeline sees
  an unchanged block index and issues no copy for it.
  """
  n = kinds.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  active = kinds != BLOCK_SKIP
  prev = jax.lax.cummax(jnp.where(active, idx, -1), axis=kinds.ndim - 1)
  nxt = jax.lax.cummin(jnp.where(active, idx, n), axis=kinds.ndim - 1, reverse=True)
  return jnp.where(prev >= 0, prev, jnp.minimum(nxt, n - 1)).astype(jnp.int32)


def active_range(kinds: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lo, hi) [...] int32: first active block and one past the last, along the last axis.

  Loops over [lo, hi) still test each block's kind (holes are possible when
  ids are not contiguous), but never touch blocks outside the range.
  """
  n = kinds.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  active = kinds != BLOCK_SKIP
  lo = jnp.min(jnp.where(active, idx, n), axis=-1)
  hi = jnp.max(jnp.where(active, idx + 1, 0), axis=-1)
  return lo.astype(jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)
