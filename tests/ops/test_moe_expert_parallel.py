"""Index arithmetic of the ragged expert-parallel exchange (ops/moe_expert_parallel.py), on one
device: what each shard would send and where it lands, against the padded exchange.

XLA:CPU has no ragged all-to-all, so the exchange itself runs on 8 simulated devices with
the emulated collective (tests/multidevice/cases.py) and is compile-checked for TPU in
tests/aot/; here the offsets of every shard are computed at once under vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ernie5_jax.ops import moe_expert_parallel as ep


def _plans(counts):
  """RaggedPlan of every shard from counts[s, r] (rows s sends to r): vmap over the shards,
  the all-to-all being the one of the real exchange (vmap has its batching rule)."""
  swap = lambda a: jax.lax.all_to_all(a, "shards", 0, 0, tiled=True)
  plans = jax.vmap(lambda c: ep.ragged_plan(c, swap), axis_name="shards")(
      jnp.asarray(counts, jnp.int32))
  return [jax.tree.map(lambda x, s=s: np.asarray(x[s]), plans) for s in range(len(counts))]


def _padded_delivery(assignments, shards):
  """Receiver r -> list of (sender, sender row) in arrival order, by the padded exchange."""
  out = {r: [] for r in range(shards)}
  for s, dests in enumerate(assignments):
    order = np.argsort(dests, kind="stable")  # sorted by destination, token order kept
    for r in range(shards):
      out[r] += [(s, int(i)) for i in order if dests[i] == r]
  return out


def test_ragged_plan_delivers_what_the_padded_exchange_delivers_in_the_same_order():
  rng = np.random.default_rng(0)
  shards, rows = 4, 12
  # Shard 3 sends nothing to shard 1 and shard 2 sends everything to shard 0 (empty slices).
  assignments = [rng.integers(0, shards, rows) for _ in range(shards)]
  assignments[3][assignments[3] == 1] = 0
  assignments[2][:] = 0
  counts = np.array([[np.sum(a == r) for r in range(shards)] for a in assignments])
  plans = _plans(counts)
  received = {r: [None] * (shards * rows) for r in range(shards)}
  for s, plan in enumerate(plans):
    order = np.argsort(assignments[s], kind="stable")  # the send buffer's rows
    for r in range(shards):
      start, size = int(plan.input_offsets[r]), int(plan.send_sizes[r])
      at = int(plan.output_offsets[r])
      for j in range(size):
        assert received[r][at + j] is None, "two slices written over each other"
        received[r][at + j] = (s, int(order[start + j]))
  want = _padded_delivery(assignments, shards)
  for r, plan in enumerate(plans):
    total = int(np.sum(plan.recv_sizes))
    assert received[r][:total] == want[r]  # contiguous, sender-major, token order
    assert all(x is None for x in received[r][total:])
    np.testing.assert_array_equal(plan.recv_sizes, counts[:, r])
    np.testing.assert_array_equal(plan.recv_offsets, np.cumsum(counts[:, r]) - counts[:, r])
  # The way back: shard r returns sender s's block from recv_offsets[s] to where s had it.
  for s, plan in enumerate(plans):
    np.testing.assert_array_equal(
        plan.sent_from, [int(plans[r].input_offsets[s]) for r in range(shards)])
