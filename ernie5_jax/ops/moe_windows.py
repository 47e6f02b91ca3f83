"""Routed SwiGLU experts over expert windows (the CPU "gather" and "capacity" backends).

Assignments (token t, slot k; n = t*K + k) are sorted by expert into a padded layout:
expert e's rows start at a multiple of W and fill ceil(count_e / W) tiles of W rows, the
tail of its last tile zero. Each expert's tiles are cut into windows of 8, 4, 2 and
1 tiles (largest first: at most one window of each smaller size per expert), and one loop
per window size runs one window per iteration with that expert's weights as they are (no
copy):

  a = x_w W_gate[e],  b = x_w W_up[e],  y_w = (silu(a) * b * w_w) W_down[e]

Each loop's trip count is the number of windows of its size this routing needs, so the
rows computed are the assignments plus less than one tile of padding per busy expert,
whatever the skew; the large windows keep the dots large where the routing allows.
A padded layout of static per-expert capacity cannot do that: to stay dropless it must
hold the busiest expert, and a freshly initialised router already sends 2-5x the mean
load to some experts (measured at init on benchmarks/presets.py's "medium": the busiest
of 64 experts held 2.7-4.9x the mean in every layer). W = ceil(m / 4) rounded up to 8 and
clipped to [8, 256] (m = N / E, the balanced load), so a balanced expert runs as one or two
windows and pads less than a quarter of its load.

Padding rows read token "none" (zeros) and have combine weight 0, so they add nothing
forward or backward; dropped ("capacity": rank >= C) and "no expert" (id = E,
ops/moe_dispatch.py) assignments have no row and read as zero.

One `jax.custom_vjp`: the forward keeps the gate and up pre-activations of every row,
the backward runs the same windows, adding each window's weight gradient into its
expert's slice (an in-place update of the loop carry). Data movement is one gather of x
into the layout and K gathers back per token, forward and backward; no scatter-add.
Combine weights scale the hidden activations (F wide) before the down projection, so
their gradient is a dot over F and no [N, D] expert output is kept for the backward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

WINDOW_TILES = (8, 4, 2, 1)  # window sizes, in tiles of W rows, largest first


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
  if n * (num_experts + 1) < 2**31:  # one sort of unique packed keys: ~3x faster than argsort
    order = jnp.sort(expert * n + iota) % n
  else:
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)  # [N]
  counts = jnp.bincount(expert, length=num_experts).astype(jnp.int32)  # [E]
  starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)  # [E]
  # Inverse permutation: a scatter of N int32s (cheap), so rank needs no second sort.
  inverse = jnp.zeros((n,), jnp.int32).at[order].set(iota, unique_indices=True)
  return Assignments(expert, order, inverse - starts[expert], counts, starts)


def window_rows(num_assignments: int, num_experts: int) -> int:
  """W: a quarter of the balanced load N / E, rounded up to a multiple of 8, within [8, 256]."""
  quarter = -(-num_assignments // (4 * num_experts))
  return int(min(256, max(8, -(-quarter // 8) * 8)))


class Layout(NamedTuple):
  """Where each assignment sits in the padded expert-sorted layout, and its windows."""
  row: jax.Array  # [N] int32: layout row of assignment n (num_rows if dropped)
  source: jax.Array  # [num_rows] int32: assignment of each layout row (N if padding)
  windows: tuple  # per window size that fits: (tiles, expert [max_w], start [max_w], num [])


def layout(asg: Assignments, rows: int, capacity: int | None = None) -> Layout:
  """The padded layout of tiles of `rows` rows over each expert's first min(count, C) rows."""
  num_assignments, num_experts = asg.expert.shape[0], asg.counts.shape[0]
  counts = asg.counts if capacity is None else jnp.minimum(asg.counts, capacity)  # [E]
  tiles = -(-counts // rows)  # [E]
  first_tile = jnp.cumsum(tiles) - tiles  # [E]
  num_rows = layout_rows(num_assignments, num_experts, rows)
  kept = asg.rank < counts[asg.expert]  # [N]
  row = jnp.where(kept, first_tile[asg.expert] * rows + asg.rank, num_rows).astype(jnp.int32)
  source = jnp.full((num_rows,), num_assignments, jnp.int32).at[row].set(
      jnp.arange(num_assignments, dtype=jnp.int32), mode="drop", unique_indices=True)
  # Sizes longer than the layout never occur (an expert holds at most num_rows rows).
  sizes = [size for size in WINDOW_TILES if size * rows <= num_rows]
  windows, done = [], jnp.zeros_like(tiles)  # done: tiles of each expert in larger windows
  for size in sizes:
    count = (tiles - done) // size  # [E]: 0 or 1 for every size but the largest
    end = jnp.cumsum(count)
    max_windows = -(-num_rows // (rows * size)) if size == sizes[0] else num_experts
    i = jnp.arange(max_windows, dtype=jnp.int32)
    # Unused trailing entries map past the last expert: clamped, never run.
    expert = jnp.minimum(jnp.searchsorted(end, i, side="right"), num_experts - 1)
    tile = first_tile[expert] + done[expert] + (i - (end - count)[expert]) * size
    windows.append((size, expert.astype(jnp.int32), (tile * rows).astype(jnp.int32),
                    end[-1].astype(jnp.int32)))
    done = done + count * size
  return Layout(row, source, tuple(windows))


def layout_rows(num_assignments: int, num_experts: int, rows: int) -> int:
  """Rows of the padded layout: every assignment plus less than one tile per expert."""
  return -(-num_assignments // rows) * rows + num_experts * rows


def _gather_rows(values, lay: Layout, top_k: int):
  """values [T, X] (per token) -> [num_rows, X] in layout order; padding rows are 0."""
  return jnp.take(values, lay.source // top_k, axis=0, mode="fill", fill_value=0)


def _run_windows(lay: Layout, rows: int, body, carry):
  """Runs body(size_rows, expert, start, carry) over every window, one loop per size."""
  for size, expert, start, num in lay.windows:
    step = functools.partial(body, size * rows)
    carry = jax.lax.fori_loop(0, num, lambda i, c, e=expert, s=start, f=step: f(e[i], s[i], c),
                              carry)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def routed_swiglu(rows: int, capacity: int | None, x, weights, asg: Assignments, w_gate, w_up,
                  w_down):
  """y [T, D] = sum_k weights[t*K + k] * SwiGLU_{expert}(x[t]) over windows of tiles of `rows`.

  capacity: None (dropless) or C: an expert's assignments of rank >= C contribute 0.
  weights: [N] combine weight per assignment; asg: sort_assignments(...);
  w_gate, w_up [E, D, F]; w_down [E, F, D].
  """
  return _forward(rows, capacity, x, weights, asg, w_gate, w_up, w_down)[0]


def _forward(rows, capacity, x, weights, asg, w_gate, w_up, w_down):
  lay = layout(asg, rows, capacity)
  top_k = asg.expert.shape[0] // x.shape[0]
  xs = _gather_rows(x, lay, top_k)  # [R, D]
  ws = jnp.take(weights, lay.source, mode="fill", fill_value=0)  # [R]

  def body(size, e, s, carry):
    ys, pre_a, pre_b = carry
    xw = jax.lax.dynamic_slice_in_dim(xs, s, size)  # [size, D]
    ww = jax.lax.dynamic_slice_in_dim(ws, s, size)
    a = xw @ w_gate[e]  # [size, F]
    b = xw @ w_up[e]
    y = (jax.nn.silu(a) * b * ww[:, None]) @ w_down[e]  # [size, D]
    put = lambda table, value: jax.lax.dynamic_update_slice_in_dim(table, value, s, 0)
    return put(ys, y), put(pre_a, a), put(pre_b, b)

  n_rows, hidden = xs.shape[0], w_gate.shape[2]
  zeros = lambda width: jnp.zeros((n_rows, width), x.dtype)
  ys, pre_a, pre_b = _run_windows(lay, rows, body,
                                  (zeros(x.shape[1]), zeros(hidden), zeros(hidden)))
  y = _gather_back(ys, lay, x.shape[0])
  return y, (x, weights, asg, w_gate, w_up, w_down, pre_a, pre_b)


def _gather_back(table, lay: Layout, num_tokens: int):
  """[R, X] layout rows -> [T, X]: each token's sum over its K rows (dropped ones: 0)."""
  inv = lay.row.reshape(num_tokens, -1)  # [T, K] layout row of (t, k)
  take = lambda k: jnp.take(table, inv[:, k], axis=0, mode="fill", fill_value=0)
  out = take(0)
  for k in range(1, inv.shape[1]):
    out = out + take(k)
  return out


def _backward(rows, capacity, saved, dy):
  x, weights, asg, w_gate, w_up, w_down, pre_a, pre_b = saved
  lay = layout(asg, rows, capacity)
  top_k = asg.expert.shape[0] // x.shape[0]
  xs, dys = _gather_rows(x, lay, top_k), _gather_rows(dy, lay, top_k)  # [R, D]
  ws = jnp.take(weights, lay.source, mode="fill", fill_value=0)  # [R]

  def body(size, e, s, carry):
    dxs, dws, dw_gate, dw_up, dw_down = carry
    take = lambda table: jax.lax.dynamic_slice_in_dim(table, s, size)
    xw, dyw = take(xs), take(dys)  # [size, D]
    ww = take(ws)[:, None]
    a, b = take(pre_a), take(pre_b)  # [size, F]
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = silu * b
    g = dyw @ w_down[e].T  # d loss / d (weighted h): [size, F]
    dh = g * ww
    da = dh * b * sig * (1 + a * (1 - sig))  # silu'(a) = sig * (1 + a * (1 - sig))
    db = dh * silu
    dx = da @ w_gate[e].T + db @ w_up[e].T  # [size, D]
    put = lambda table, value: jax.lax.dynamic_update_slice_in_dim(table, value, s, 0)
    add = lambda table, value: table.at[e].add(value)
    return (put(dxs, dx), put(dws, jnp.sum(g * h, axis=-1)),
            add(dw_gate, xw.T @ da), add(dw_up, xw.T @ db), add(dw_down, (h * ww).T @ dyw))

  init = (jnp.zeros_like(xs), jnp.zeros_like(ws), jnp.zeros_like(w_gate), jnp.zeros_like(w_up),
          jnp.zeros_like(w_down))
  dxs, dws, dw_gate, dw_up, dw_down = _run_windows(lay, rows, body, init)
  dx = _gather_back(dxs, lay, x.shape[0])
  d_weights = jnp.take(dws, lay.row, mode="fill", fill_value=0)  # [N]
  return dx, d_weights, None, dw_gate, dw_up, dw_down


routed_swiglu.defvjp(_forward, _backward)
