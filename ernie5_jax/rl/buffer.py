"""The unbiased replay buffer of ERNIE 5.0's RL: groups enter training in a fixed order, whole.

Ordering rule (ERNIE 5.0 technical report, RL section, "unbiased replay buffer"):
  * `start_iteration(group_ids)` fixes the iteration's groups and their order;
  * `add(group_id, rollout_index, data, complete)` records each of a group's G rollouts as
    the rollout engine finishes it, in any order across groups and rollouts;
  * `ready()` releases a *prefix* of that order: group k leaves only when all G of its
    rollouts are complete AND groups 0 .. k-1 have left.
A group of short, easy responses that finishes early therefore waits for the slower groups
in front of it; training never sees a sample skewed toward what is quick to generate.

`complete=False` records a partial rollout (e.g. a chunk of a partial-rollout engine); it
may be re-added until it is complete. Re-adding a complete rollout is an error.

Checkpoint (`state_dict` / `load_state_dict`, JSON-able): the group order, the number of
groups released, and, for each unreleased group, its complete rollouts. With
`with_payload=True` (default) the complete rollouts' data travel too, so a resumed run
continues exactly; the data must then be numpy arrays, numbers, strings, None, or
dicts / lists / tuples of them (arrays keep dtype and shape). With `with_payload=False`
only the order and released count are kept and a resumed iteration re-generates every
rollout of its unreleased groups (`missing()` lists them). Partial (incomplete) rollouts
are never saved: they are re-generated from scratch after a resume.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

STATE_VERSION = 1


def _canonical_id(group_id: Any) -> int | str:
  """Group ids are ints or strings (so they survive JSON unchanged)."""
  if isinstance(group_id, (bool, np.bool_)):
    raise TypeError(f"group_id={group_id!r} is not accepted: expected an int or a str")
  if isinstance(group_id, numbers.Integral):
    return int(group_id)
  if isinstance(group_id, str):
    return group_id
  raise TypeError(f"group_id={group_id!r} ({type(group_id).__name__}) is not accepted: "
                  "expected an int or a str")


def encode_payload(x: Any) -> Any:
  """Turns numpy arrays / scalars inside dicts, lists and tuples into JSON-able values."""
  if isinstance(x, np.ndarray):
    return {"__ndarray__": x.tolist(), "dtype": x.dtype.str, "shape": list(x.shape)}
  if isinstance(x, np.generic):
    return encode_payload(np.asarray(x))
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, dict):
    if not all(isinstance(k, str) for k in x):
      raise TypeError(f"payload dict keys {list(x)!r} are not accepted: expected str keys")
    if "__ndarray__" in x or "__tuple__" in x:
      raise TypeError("payload dict keys '__ndarray__' / '__tuple__' are reserved")
    return {k: encode_payload(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return {"__tuple__": [encode_payload(v) for v in x]}
  if isinstance(x, list):
    return [encode_payload(v) for v in x]
  raise TypeError(f"payload of type {type(x).__name__} is not accepted in state_dict: expected "
                  "numpy arrays, numbers, str, None, or dict/list/tuple of them "
                  "(or call state_dict(with_payload=False))")


def decode_payload(x: Any) -> Any:
  """Inverse of encode_payload."""
  if isinstance(x, dict):
    if "__ndarray__" in x:
      return np.asarray(x["__ndarray__"], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
    if "__tuple__" in x:
      return tuple(decode_payload(v) for v in x["__tuple__"])
    return {k: decode_payload(v) for k, v in x.items()}
  if isinstance(x, list):
    return [decode_payload(v) for v in x]
  return x


class ReplayBuffer:
  """Holds one iteration's rollout groups and releases them whole, in the fixed order."""

  def __init__(self, group_size: int):
    if not isinstance(group_size, numbers.Integral) or group_size < 1:
      raise ValueError(f"group_size={group_size!r} is not accepted: expected an int >= 1")
    self.group_size = int(group_size)
    self._order: list[int | str] = []   # the iteration's groups, in release order
    self._released = 0                  # groups order[:released] have left
    self._complete: dict[int | str, dict[int, Any]] = {}  # unreleased group -> idx -> data
    self._partial: dict[int | str, dict[int, Any]] = {}   # unreleased group -> idx -> data

  # -- iteration ------------------------------------------------------------------------------
  def start_iteration(self, group_ids: Sequence[Any], *, drop_pending: bool = False) -> None:
    """Fixes the iteration's groups and their release order (unique ints or strings)."""
    ids = [_canonical_id(g) for g in group_ids]
    if len(set(ids)) != len(ids):
      dup = sorted({g for g in ids if ids.count(g) > 1}, key=str)
      raise ValueError(f"group_ids has duplicates {dup}: expected unique ids")
    if self.pending() and not drop_pending:
      raise RuntimeError(f"start_iteration: {self.pending()} group(s) of the previous iteration "
                         f"were not released (next: {self._order[self._released]!r}); "
                         "consume them with ready() or pass drop_pending=True")
    self._order = ids
    self._released = 0
    self._complete = {g: {} for g in ids}
    self._partial = {g: {} for g in ids}

  def add(self, group_id: Any, rollout_index: int, data: Any, complete: bool = True) -> None:
    """Records rollout `rollout_index` of group `group_id` (complete or a partial update)."""
    gid = _canonical_id(group_id)
    if gid not in self._complete:
      if gid in self._order:
        raise ValueError(f"group_id={gid!r} was already released by ready(); "
                         "its rollouts cannot change")
      shown = self._order[self._released:self._released + 8]
      raise ValueError(f"group_id={gid!r} is not a group of this iteration: expected one of the "
                       f"unreleased groups {shown}{' ...' if self.pending() > 8 else ''} "
                       "(fixed by start_iteration)")
    if (not isinstance(rollout_index, numbers.Integral) or isinstance(rollout_index, bool)
        or not 0 <= rollout_index < self.group_size):
      raise ValueError(f"rollout_index={rollout_index!r} is not accepted for group {gid!r}: "
                       f"expected an int in [0, {self.group_size}) (group_size)")
    idx = int(rollout_index)
    if idx in self._complete[gid]:
      raise ValueError(f"rollout {idx} of group {gid!r} was already added as complete: "
                       "duplicate add")
    if complete:
      self._partial[gid].pop(idx, None)
      self._complete[gid][idx] = data
    else:
      self._partial[gid][idx] = data

  def add_group(self, group_id: Any, rollouts: Sequence[Any], complete: bool | Sequence[bool] = True
                ) -> None:
    """Adds rollouts 0 .. G-1 of one group at once (complete: one flag or one per rollout)."""
    if len(rollouts) != self.group_size:
      raise ValueError(f"rollouts has {len(rollouts)} entries for group {group_id!r}: "
                       f"expected group_size={self.group_size}")
    flags = ([complete] * self.group_size if isinstance(complete, (bool, np.bool_))
             else list(complete))
    if len(flags) != self.group_size:
      raise ValueError(f"complete has {len(flags)} flags for group {group_id!r}: expected one "
                       f"bool or group_size={self.group_size} of them")
    for i, (data, flag) in enumerate(zip(rollouts, flags)):
      self.add(group_id, i, data, bool(flag))

  def ready(self) -> list[tuple[int | str, list[Any]]]:
    """Pops the released prefix: [(group_id, [data of rollout 0 .. G-1])] in the fixed order."""
    out = []
    while self._released < len(self._order):
      gid = self._order[self._released]
      if len(self._complete[gid]) < self.group_size:
        break  # this group holds back every group behind it
      rollouts = self._complete.pop(gid)
      self._partial.pop(gid)
      out.append((gid, [rollouts[i] for i in range(self.group_size)]))
      self._released += 1
    return out

  # -- counts ---------------------------------------------------------------------------------
  def pending(self) -> int:
    """Number of groups of the iteration not released yet."""
    return len(self._order) - self._released

  def held_back(self) -> int:
    """Number of unreleased groups that are complete but wait behind an incomplete one."""
    return sum(len(r) == self.group_size for r in self._complete.values())

  def missing(self) -> list[tuple[int | str, int]]:
    """(group_id, rollout_index) of every rollout not yet complete, in release order."""
    return [(g, i) for g in self._order[self._released:] for i in range(self.group_size)
            if i not in self._complete[g]]

  def released(self) -> int:
    """Number of the iteration's groups already released by ready()."""
    return self._released

  # -- checkpoint -----------------------------------------------------------------------------
  def state_dict(self, *, with_payload: bool = True) -> dict[str, Any]:
    """JSON-able state: order, released count and the unreleased groups' complete rollouts."""
    groups = []
    for g in self._order[self._released:]:
      done = sorted(self._complete[g])
      entry: dict[str, Any] = {"id": g, "complete": done}
      if with_payload:
        entry["data"] = [encode_payload(self._complete[g][i]) for i in done]
      groups.append(entry)
    return {"version": STATE_VERSION, "group_size": self.group_size, "order": list(self._order),
            "released": self._released, "with_payload": with_payload, "groups": groups}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores a state_dict(); without payload, unreleased groups restart empty."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"replay buffer state version={state.get('version')!r} is not accepted: "
                       f"expected {STATE_VERSION}")
    if state["group_size"] != self.group_size:
      raise ValueError(f"replay buffer state group_size={state['group_size']} does not match "
                       f"this buffer's group_size={self.group_size}")
    order = [_canonical_id(g) for g in state["order"]]
    released = int(state["released"])
    unreleased = order[released:]
    if [_canonical_id(e["id"]) for e in state["groups"]] != unreleased:
      raise ValueError("replay buffer state is inconsistent: 'groups' must list order[released:]")
    self._order, self._released = order, released
    self._complete = {g: {} for g in unreleased}
    self._partial = {g: {} for g in unreleased}
    if state["with_payload"]:
      for g, entry in zip(unreleased, state["groups"]):
        for i, data in zip(entry["complete"], entry["data"], strict=True):
          self._complete[g][int(i)] = decode_payload(data)


# --- out-of-order completion: why the order matters -------------------------------------------
def completion_events(lengths: np.ndarray, *, workers: int) -> list[tuple[int, int]]:
  """(group, rollout) pairs in the order a rollout engine finishes them.

  A faithful model of variable-length completion: the engine decodes up to `workers`
  sequences at once, one token per sequence per step (continuous batching); sequences are
  admitted in (group, rollout) order as slots free up, and one of R tokens finishes R
  steps after it was admitted. lengths: [groups, group_size] response tokens (>= 1).
  """
  lengths = np.asarray(lengths)
  if lengths.ndim != 2 or (lengths < 1).any():
    raise ValueError(f"lengths of shape {lengths.shape} is not accepted: expected "
                     "[groups, group_size] response lengths >= 1")
  if workers < 1:
    raise ValueError(f"workers={workers} is not accepted: expected >= 1")
  queue = [(g, i) for g in range(lengths.shape[0]) for i in range(lengths.shape[1])]
  running: list[tuple[float, int, int, int]] = []  # heap of (finish step, admission, g, i)
  events = []
  for admitted, (g, i) in enumerate(queue):
    start = 0.0
    if len(running) >= workers:  # Wait for a slot: the earliest finish leaves.
      start, _, gg, ii = heapq.heappop(running)
      events.append((gg, ii))
    heapq.heappush(running, (start + float(lengths[g, i]), admitted, g, i))
  while running:
    _, _, g, i = heapq.heappop(running)
    events.append((g, i))
  return events


def first_completed_groups(events: Sequence[tuple[int, int]], group_size: int, count: int
                           ) -> list[int]:
  """Train-as-completed: the first `count` groups whose group_size rollouts have all finished."""
  done: dict[int, int] = {}
  out = []
  for g, _ in events:
    done[g] = done.get(g, 0) + 1
    if done[g] == group_size:
      out.append(g)
      if len(out) == count:
        break
  return out


def released_groups(events: Sequence[tuple[int, int]], group_size: int, count: int,
                    order: Sequence[int]) -> list[int]:
  """The first `count` groups a ReplayBuffer releases when rollouts arrive as `events`."""
  buffer = ReplayBuffer(group_size)
  buffer.start_iteration(order)
  out: list[int] = []
  for g, i in events:
    buffer.add(g, i, None)
    out += [gid for gid, _ in buffer.ready()]
    if len(out) >= count:
      break
  return out[:count]
