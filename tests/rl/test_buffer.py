"""Tests for ernie5_jax/rl/buffer.py: the ordering rule, counts, state round trip, errors."""

import json

import numpy as np
import pytest

from ernie5_jax.rl import buffer as buffer_lib
from ernie5_jax.rl.buffer import ReplayBuffer

G = 3


def payload(g, i):
  return {"tokens": np.arange(4, dtype=np.int32) + 10 * i, "logp": np.full((2,), 0.1 * i + 1,
          np.float32), "meta": (g, i, "x"), "ok": np.bool_(True)}


def fill(buf, group, indices, complete=True):
  for i in indices:
    buf.add(group, i, payload(group, i), complete)


def test_later_group_waits_for_earlier_ones():
  buf = ReplayBuffer(G)
  buf.start_iteration([10, 11, 12])
  fill(buf, 12, range(G))       # the last group finishes first (short, easy responses)
  fill(buf, 11, [2, 0, 1])      # any rollout order
  assert buf.ready() == [] and buf.pending() == 3 and buf.held_back() == 2
  fill(buf, 10, [0, 1])
  fill(buf, 10, [2], complete=False)  # a partial rollout does not complete the group
  assert buf.ready() == []
  assert buf.missing() == [(10, 2)]
  fill(buf, 10, [2])
  out = buf.ready()
  assert [g for g, _ in out] == [10, 11, 12]
  for g, rollouts in out:
    assert len(rollouts) == G
    for i, r in enumerate(rollouts):  # in rollout-index order, whatever the add order
      np.testing.assert_array_equal(r["tokens"], payload(g, i)["tokens"])
  assert buf.pending() == 0 and buf.ready() == []


def test_partial_group_holds_back_the_rest():
  buf = ReplayBuffer(G)
  buf.start_iteration(["a", "b", "c"])
  fill(buf, "a", range(G))
  fill(buf, "b", range(G - 1))  # b misses one rollout
  fill(buf, "c", range(G))
  assert [g for g, _ in buf.ready()] == ["a"]
  assert buf.ready() == [] and buf.pending() == 2 and buf.released() == 1
  fill(buf, "b", [G - 1])
  assert [g for g, _ in buf.ready()] == ["b", "c"]


def test_partial_then_complete_replaces_data():
  buf = ReplayBuffer(1)
  buf.start_iteration([0])
  buf.add(0, 0, "chunk 1", complete=False)
  buf.add(0, 0, "chunk 1+2", complete=False)
  buf.add(0, 0, "final", complete=True)
  assert buf.ready() == [(0, ["final"])]


def test_add_group():
  buf = ReplayBuffer(G)
  buf.start_iteration([1, 2])
  buf.add_group(2, ["x", "y", "z"])
  buf.add_group(1, ["p", "q", "r"], complete=[True, False, True])
  assert buf.ready() == [] and buf.missing() == [(1, 1)]
  buf.add(1, 1, "q2")
  assert buf.ready() == [(1, ["p", "q2", "r"]), (2, ["x", "y", "z"])]
  buf.start_iteration([3])
  with pytest.raises(ValueError, match="expected group_size=3"):
    buf.add_group(3, ["only one"])
  with pytest.raises(ValueError, match="complete has 2 flags"):
    buf.add_group(3, ["x", "y", "z"], complete=[True, True])
  assert buf.missing() == [(3, 0), (3, 1), (3, 2)]  # nothing was added


@pytest.mark.parametrize("with_payload", [True, False])
def test_state_round_trip(with_payload):
  buf = ReplayBuffer(G)
  buf.start_iteration([5, 6, 7, 8])
  fill(buf, 5, range(G))
  fill(buf, 7, range(G))
  fill(buf, 6, [1])
  fill(buf, 6, [0], complete=False)
  assert [g for g, _ in buf.ready()] == [5]
  state = json.loads(json.dumps(buf.state_dict(with_payload=with_payload)))

  restored = ReplayBuffer(G)
  restored.load_state_dict(state)
  assert restored.pending() == 3 and restored.released() == 1
  if with_payload:
    # Exact resume: the complete rollouts came back (partial ones must be re-generated).
    assert restored.missing() == [(6, 0), (6, 2), (8, 0), (8, 1), (8, 2)]
    assert restored.held_back() == 1
  else:
    assert restored.missing() == [(g, i) for g in (6, 7, 8) for i in range(G)]
  for g, i in restored.missing():
    restored.add(g, i, payload(g, i))
  fill(buf, 6, [0, 2])
  fill(buf, 8, range(G))
  want, got = buf.ready(), restored.ready()
  assert [g for g, _ in got] == [g for g, _ in want] == [6, 7, 8]
  for (_, rw), (_, rg) in zip(want, got):
    for a, b in zip(rw, rg):
      for k in ("tokens", "logp", "ok"):
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        np.testing.assert_array_equal(a[k], b[k])
      assert a["meta"] == b["meta"]


def test_state_errors():
  buf = ReplayBuffer(G)
  buf.start_iteration([1])
  buf.add(1, 0, object())
  with pytest.raises(TypeError, match="with_payload=False"):
    buf.state_dict()
  state = buf.state_dict(with_payload=False)
  with pytest.raises(ValueError, match="group_size=3 does not match"):
    ReplayBuffer(2).load_state_dict(state)
  with pytest.raises(ValueError, match="version=7"):
    ReplayBuffer(G).load_state_dict({**state, "version": 7})


def test_errors():
  buf = ReplayBuffer(G)
  buf.start_iteration([1, 2])
  with pytest.raises(ValueError, match=r"group_id=9 is not a group of this iteration"):
    buf.add(9, 0, None)
  with pytest.raises(ValueError, match=r"rollout_index=3 .* \[0, 3\)"):
    buf.add(1, G, None)
  with pytest.raises(ValueError, match=r"rollout_index=-1"):
    buf.add(1, -1, None)
  buf.add(1, 0, None)
  with pytest.raises(ValueError, match="rollout 0 of group 1 was already added as complete"):
    buf.add(1, 0, None)
  with pytest.raises(ValueError, match="rollout 0 of group 1 was already added as complete"):
    buf.add(1, 0, None, complete=False)
  fill(buf, 1, [1, 2])
  buf.ready()
  with pytest.raises(ValueError, match="group_id=1 was already released"):
    buf.add(1, 0, None)
  with pytest.raises(RuntimeError, match="1 group.* not released"):
    buf.start_iteration([3])
  buf.start_iteration([3], drop_pending=True)
  assert buf.pending() == 1
  with pytest.raises(ValueError, match=r"duplicates \[4\]"):
    buf.start_iteration([4, 4], drop_pending=True)
  with pytest.raises(TypeError, match="group_id=1.5"):
    buf.start_iteration([1.5], drop_pending=True)
  with pytest.raises(ValueError, match="group_size=0"):
    ReplayBuffer(0)


def test_out_of_order_completion_biases_train_as_completed_not_the_buffer():
  """Rollouts of variable length finish out of order (continuous batching simulation):
  training on the groups that complete first over-represents short responses; the
  unbiased replay buffer releases the fixed order's prefix, whatever finishes first."""
  rng = np.random.default_rng(0)
  groups, g, batch = 64, 4, 16
  fast, urb, population = [], [], []
  for _ in range(200):
    mean = rng.integers(1, 33, size=(groups, 1))  # per-prompt difficulty: response length
    lengths = np.maximum(1, mean + rng.integers(-2, 3, size=(groups, g)))
    events = buffer_lib.completion_events(lengths, workers=groups * g)  # one engine batch
    assert sorted(events) == [(a, b) for a in range(groups) for b in range(g)]
    order = list(rng.permutation(groups))  # the iteration's fixed order
    chosen = buffer_lib.first_completed_groups(events, g, batch)
    released = buffer_lib.released_groups(events, g, batch, order)
    assert released == order[:batch]  # the prefix, not what finished first
    fast.append(lengths[chosen].mean())
    urb.append(lengths[released].mean())
    population.append(lengths.mean())
  assert np.mean(fast) < 0.6 * np.mean(population)  # short responses over-represented
  assert abs(np.mean(urb) - np.mean(population)) < 0.05 * np.mean(population)  # ~3 s.e.
  # Whatever the engine's width, the first event is a shortest-finishing rollout.
  lengths = np.array([[5, 1], [3, 4]])
  assert buffer_lib.completion_events(lengths, workers=4)[0] == (0, 1)
  assert buffer_lib.completion_events(lengths, workers=1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
  with pytest.raises(ValueError, match=r"lengths of shape \(4,\) is not accepted"):
    buffer_lib.completion_events(np.ones(4), workers=2)
