"""Padded expert-slot kernels for routed SwiGLU experts (the CPU "gather" and "capacity" backends).

Assignments (token t, slot k; n = t*K + k) are sorted by expert, and each
expert's run of assignments is cut into segments that batched einsums (the
fastest grouped matmul XLA has on CPU) can take:
- bulk: ranks [0, C0) of every expert in an [E, C0, D] slot layout, using the
  expert weights as they are. The capacity backend is this alone (ranks >= C0 drop).
- tail: ranks [C0, ...) in G_t tiles of R_t rows, each tile with its expert's
  weights gathered ([G_t, D, F]) and its weight gradient added back per expert.
- leftover: whatever the tail cannot hold (strongly skewed routing), under a
  `lax.cond`, in tiles of ~N/E rows: ceil(N / rows) + E tiles hold any routing.
The dropless plan sets C0 = m + 2 sqrt(m), m = N / E the balanced load: two
standard deviations of a balanced multinomial load, so the bulk is mostly real
rows and a few tail tiles take the overflow of the busiest experts. Measured on
a 2-core CPU (T=4096, D=512, F=256, E=64, top-4): a capacity picked at run time
by `lax.switch` over a ladder was ~0.25x of a dense MLP's time slower than this
(conditional + layout-independent residual copies), and a tail tile costs about
3.5 bulk rows per row (its weight gather and per-tile weight gradient), so the
tail is kept for the overflow only.

The computation is one `jax.custom_vjp`. The forward saves the gate and up
pre-activations of the bulk and tail (the leftover recomputes its own). Data
movement is gathers (dispatch, combine and their transposes through the
inverse maps), never a scatter-add, except the small per-tile weight gradients.
Combine weights scale the hidden activations (F wide) before the linear down
projection instead of the outputs (D wide), so their gradient is a dot over F
and no [N, D] expert output is kept for the backward pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Assignments(NamedTuple):
  """Routing of N = T*K assignments (n = t*K + k) to experts in [0, E), sorted by expert."""
  expert: jax.Array  # [N] int32: expert of assignment n
  order: jax.Array  # [N] int32: assignment at each expert-sorted position (stable: token order)
  rank: jax.Array  # [N] int32: position of assignment n among its expert's assignments
  counts: jax.Array  # [E] int32: assignments per expert (the expert load)
  starts: jax.Array  # [E] int32: first expert-sorted position of each expert


def sort_assignments(expert_ids: jax.Array, num_experts: int) -> Assignments:
  """Sorts the [T, K] expert choices by expert (stable, so ties keep token order)."""
  expert = expert_ids.reshape(-1).astype(jnp.int32)  # [N]
  n = expert.shape[0]
  iota = jnp.arange(n, dtype=jnp.int32)
  if n * num_experts < 2**31:  # one sort of unique packed keys: ~3x faster than argsort on CPU
    order = jnp.sort(expert * n + iota) % n
  else:
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)  # [N]
  counts = jnp.bincount(expert, length=num_experts).astype(jnp.int32)  # [E]
  starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)  # [E]
  # Inverse permutation: a scatter of N int32s (cheap), so rank needs no second sort.
  inverse = jnp.zeros((n,), jnp.int32).at[order].set(iota, unique_indices=True)
  return Assignments(expert, order, inverse - starts[expert], counts, starts)


class Plan(NamedTuple):
  """Static segment sizes. tail_groups = 0: no tail; left_groups = 0: no leftover (drops)."""
  bulk_rows: int  # C0
  tail_rows: int = 0  # R_t
  tail_groups: int = 0  # G_t
  left_rows: int = 0
  left_groups: int = 0


def capacity_plan(capacity: int) -> Plan:
  """Token dropping: ranks >= capacity contribute nothing."""
  return Plan(bulk_rows=capacity)


def dropless_plan(num_assignments: int, num_experts: int) -> Plan:
  """Bulk C0 = m + 2 sqrt(m) (m = N / E), tail of max(1, E // 4) tiles, leftover for the rest."""
  n, e = num_assignments, num_experts
  mean = -(-n // e)
  bulk = min(n, _round_up(mean + 2 * math.isqrt(mean), 8))
  if bulk == n:  # small problems: the bulk holds every assignment
    return Plan(bulk_rows=n)
  left_rows = min(n, _round_up(mean, 8))
  return Plan(bulk_rows=bulk, tail_rows=_round_up(2 * math.isqrt(mean), 8),
              tail_groups=max(1, e // 4), left_rows=left_rows, left_groups=-(-n // left_rows) + e)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


class _Maps(NamedTuple):
  """Index maps of one segment layout [G, rows]."""
  group_expert: jax.Array  # [G] int32 expert whose weights group g uses
  src: jax.Array  # [G, rows] int32 assignment held by each row (junk where not valid)
  valid: jax.Array  # [G, rows] bool row holds an assignment
  member: jax.Array  # [N] bool assignment is in this segment
  pos: jax.Array  # [N] int32 flat layout row of each member assignment (0 otherwise)


def _segment_maps(tiled: bool, rows: int, groups: int, asg: Assignments, lo, count) -> _Maps:
  """Layout of ranks [lo[e], lo[e] + count[e]) of every expert e ([E] int32 each).

  Not tiled: group g = expert g, count <= rows. Tiled: each expert's ranks cut into
  tiles of `rows`, tiles of one expert adjacent, ceil(count / rows) summed <= groups.
  """
  n = asg.expert.shape[0]
  num_experts = asg.counts.shape[0]
  if not tiled:
    group_expert = jnp.arange(num_experts, dtype=jnp.int32)
    group_start, group_len = asg.starts + lo, count
    base = group_expert * rows  # [E] flat row of each expert's first covered rank
  else:
    tiles = -(-count // rows)  # [E]
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    g = jnp.arange(groups, dtype=jnp.int32)
    # Unused trailing tiles map past the last expert: clamped, and they get no rows.
    group_expert = jnp.minimum(jnp.searchsorted(tile_end, g, side="right"),
                               num_experts - 1).astype(jnp.int32)
    first = (g - tile_start[group_expert]) * rows  # covered rank of the tile's first row
    group_start = asg.starts[group_expert] + lo[group_expert] + first
    group_len = jnp.clip(count[group_expert] - first, 0, rows)
    base = (tile_start * rows).astype(jnp.int32)
  c = jnp.arange(rows, dtype=jnp.int32)
  valid = c[None, :] < group_len[:, None]
  sorted_pos = jnp.minimum(group_start[:, None] + c[None, :], n - 1)  # [G, rows]
  rel = asg.rank - lo[asg.expert]  # [N]
  member = (rel >= 0) & (rel < count[asg.expert])
  pos = jnp.where(member, base[asg.expert] + rel, 0)
  return _Maps(group_expert, asg.order[sorted_pos], valid, member, pos)


def _segments(plan: Plan, asg: Assignments):
  """(lo, count), each [E] int32, of the bulk, tail and leftover segments of every expert."""
  counts = asg.counts
  zero = jnp.zeros_like(counts)
  bulk = (zero, jnp.minimum(counts, plan.bulk_rows))
  over = jnp.maximum(counts - plan.bulk_rows, 0)
  tail_count = zero
  if plan.tail_groups:
    want = -(-over // plan.tail_rows)  # tiles each expert would need
    fit = jnp.clip(plan.tail_groups - (jnp.cumsum(want) - want), 0, want)  # in expert order
    tail_count = jnp.minimum(over, fit * plan.tail_rows)
  return bulk, (zero + plan.bulk_rows, tail_count), (plan.bulk_rows + tail_count, over - tail_count)


def _gather_rows(table, maps: _Maps, top_k: int):
  """table [T, X] -> [G, rows, X]: each row's token, zeros where not valid."""
  tok = jnp.where(maps.valid, maps.src // top_k, table.shape[0])
  return jnp.take(table, tok, axis=0, mode="fill", fill_value=0)


def _group_weights(maps: _Maps, tiled: bool, *ws):
  return ws if not tiled else tuple(w[maps.group_expert] for w in ws)


def _expert_forward(x, weights, maps: _Maps, tiled, w_gate, w_up, w_down, top_k):
  """-> flat outputs ye [G*rows, D] and pre-activations a, b [G, rows, F]."""
  wg, wu, wd = _group_weights(maps, tiled, w_gate, w_up, w_down)
  xe = _gather_rows(x, maps, top_k)  # [G, rows, D]
  we = jnp.where(maps.valid, weights[maps.src], 0)[..., None]  # [G, rows, 1]
  a = jnp.einsum("gcd,gdf->gcf", xe, wg)
  b = jnp.einsum("gcd,gdf->gcf", xe, wu)
  ye = jnp.einsum("gcf,gfd->gcd", jax.nn.silu(a) * b * we, wd)  # [G, rows, D]
  return ye.reshape(-1, ye.shape[-1]), a, b


def _expert_backward(x, weights, maps: _Maps, tiled, w_gate, w_up, w_down, a, b, dy, top_k):
  """-> flat dxe [G*rows, D], d combine weight [G*rows], per-group dW_gate, dW_up, dW_down."""
  wg, wu, wd = _group_weights(maps, tiled, w_gate, w_up, w_down)
  dye = _gather_rows(dy, maps, top_k)  # [G, rows, D]
  we = jnp.where(maps.valid, weights[maps.src], 0)[..., None]
  sig = jax.nn.sigmoid(a)
  silu = a * sig
  h = silu * b
  g = jnp.einsum("gcd,gfd->gcf", dye, wd)  # d loss / d (weighted h)
  dwd = jnp.einsum("gcf,gcd->gfd", h * we, dye)
  dwe = jnp.sum(g * h, axis=-1)  # [G, rows]
  dh = g * we
  da = dh * b * sig * (1 + a * (1 - sig))  # silu'(a) = sig * (1 + a * (1 - sig))
  db = dh * silu
  dxe = jnp.einsum("gcf,gdf->gcd", da, wg) + jnp.einsum("gcf,gdf->gcd", db, wu)
  xe = _gather_rows(x, maps, top_k)
  dwg = jnp.einsum("gcd,gcf->gdf", xe, da)
  dwu = jnp.einsum("gcd,gcf->gdf", xe, db)
  return dxe.reshape(-1, dxe.shape[-1]), dwe.reshape(-1), dwg, dwu, dwd


def _pick(parts):
  """[N, ...]: each assignment's row in the segment holding it (0 if none).

  parts: [(table [G*rows, ...], maps)] of disjoint segments.
  """
  out = None
  for table, maps in reversed(parts):  # segments are disjoint: nested selects, one pass
    row = table[maps.pos]
    member = maps.member.reshape(maps.member.shape + (1,) * (row.ndim - 1))
    out = jnp.where(member, row, 0 if out is None else out)
  return out


def _combine(parts, top_k):
  """[T, X]: sum over each token's K assignments of _pick, as K gathers (no [N, X] buffer)."""
  out = None
  for k in range(top_k):
    term = None
    for table, maps in reversed(parts):
      row = table[maps.pos.reshape(-1, top_k)[:, k]]
      member = maps.member.reshape(-1, top_k)[:, k, None]
      term = jnp.where(member, row, 0 if term is None else term)
    out = term if out is None else out + term
  return out


def _add_group_grads(dws, group_grads, maps: _Maps):
  """Adds per-tile weight gradients into the per-expert ones (tiles of one expert are adjacent)."""
  return tuple(dw.at[maps.group_expert].add(gg, indices_are_sorted=True)
               for dw, gg in zip(dws, group_grads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def routed_swiglu(plan: Plan, x, weights, asg: Assignments, w_gate, w_up, w_down):
  """y [T, D] = sum_k weights[t*K + k] * SwiGLU_{expert}(x[t]) over the plan's segments.

  plan: static Plan (dropless_plan or capacity_plan); weights: [N] combine weight per
  assignment; asg: sort_assignments(...); w_gate, w_up [E, D, F]; w_down [E, F, D].
  """
  return _routed_fwd(plan, x, weights, asg, w_gate, w_up, w_down)[0]


def _all_maps(plan: Plan, asg: Assignments):
  """Index maps of the bulk, tail (None without) and leftover segments, and whether any is left."""
  bulk, tail, left = _segments(plan, asg)
  num_experts = asg.counts.shape[0]
  bulk_maps = _segment_maps(False, plan.bulk_rows, num_experts, asg, *bulk)
  tail_maps = (_segment_maps(True, plan.tail_rows, plan.tail_groups, asg, *tail)
               if plan.tail_groups else None)
  left_maps = lambda: _segment_maps(True, plan.left_rows, plan.left_groups, asg, *left)
  return bulk_maps, tail_maps, left_maps, jnp.any(left[1] > 0)


def _routed_fwd(plan, x, weights, asg, w_gate, w_up, w_down):
  top_k = asg.expert.shape[0] // x.shape[0]
  ws = (w_gate, w_up, w_down)
  bulk, tail, left_maps, any_left = _all_maps(plan, asg)
  ye, a, b = _expert_forward(x, weights, bulk, False, *ws, top_k)
  parts, res = [(ye, bulk)], (a, b)
  if tail is not None:
    ye, a, b = _expert_forward(x, weights, tail, True, *ws, top_k)
    parts.append((ye, tail))
    res += (a, b)
  y = _combine(parts, top_k)
  if plan.left_groups:
    def leftover(y):
      left = left_maps()
      ye, _, _ = _expert_forward(x, weights, left, True, *ws, top_k)
      return y + _combine([(ye, left)], top_k)
    y = jax.lax.cond(any_left, leftover, lambda y: y, y)
  return y, (x, weights, asg, w_gate, w_up, w_down, res)


def _routed_bwd(plan, saved, dy):
  x, weights, asg, w_gate, w_up, w_down, res = saved
  top_k = asg.expert.shape[0] // x.shape[0]
  ws = (w_gate, w_up, w_down)
  bulk, tail, left_maps, any_left = _all_maps(plan, asg)
  dxe, dwe, *dws = _expert_backward(x, weights, bulk, False, *ws, *res[:2], dy, top_k)
  dx_parts, dwe_parts = [(dxe, bulk)], [(dwe, bulk)]
  if tail is not None:
    dxe, dwe, *tile_dws = _expert_backward(x, weights, tail, True, *ws, *res[2:], dy, top_k)
    dws = _add_group_grads(dws, tile_dws, tail)
    dx_parts.append((dxe, tail))
    dwe_parts.append((dwe, tail))
  grads = (_combine(dx_parts, top_k), _pick(dwe_parts), *dws)
  if plan.left_groups:
    def leftover(grads):
      dx, dweights, *dws = grads
      left = left_maps()
      _, a, b = _expert_forward(x, weights, left, True, *ws, top_k)  # recomputed, not saved
      dxe, dwe, *tile_dws = _expert_backward(x, weights, left, True, *ws, a, b, dy, top_k)
      return (dx + _combine([(dxe, left)], top_k), dweights + _pick([(dwe, left)]),
              *_add_group_grads(dws, tile_dws, left))
    grads = jax.lax.cond(any_left, leftover, lambda g: g, grads)
  dx, dweights, *dws = grads
  return (dx, dweights, None, *dws)


routed_swiglu.defvjp(_routed_fwd, _routed_bwd)
