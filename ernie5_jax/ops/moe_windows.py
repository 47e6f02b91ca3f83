"""Routed SwiGLU experts over expert windows (the CPU "gather" and "capacity" backends).

Assignments (token t, slot k; n = t*K + k) are sorted by expert. Each expert's run of
sorted rows is cut into windows of W rows (the last one partial), and a loop runs one
window per iteration with that expert's weights as they are (no copy):

  a = x_w W_gate[e],  b = x_w W_up[e],  y_w = (silu(a) * b * w_w) W_down[e]

The loop's trip count is the number of windows this routing needs,
sum_e ceil(count_e / W): at most N / W + E (N = T*K), so the rows computed are the
assignments plus less than one window of padding per busy expert, whatever the skew.
A padded layout of static per-expert capacity cannot do that: to stay dropless it must
hold the busiest expert, and a freshly initialised router already sends 2-5x the mean
load to some experts (measured at init on benchmarks/presets.py's "medium": the busiest
of 64 experts held 2.7-4.9x the mean in every layer). W = ceil(m / 2) rounded up to 8 and
clipped to [8, 256] (m = N / E the balanced load) keeps both the padding and the loop
overhead small; measured on a 2-core CPU against the earlier padded-slot layout (bulk
[E, m + 2 sqrt(m)] + tiles for the overflow), forward + backward: equal at balanced
routing, 2.2-2.6x faster at init-like skew.

Rows past a window's valid count belong to the next window, which is written after it
(windows run in sorted order), or to no assignment; they are masked to zero, so dropped
("capacity") and "no expert" (id = E, ops/moe_dispatch.py) rows read as zero.

One `jax.custom_vjp`: the forward keeps the gate and up pre-activations of every row,
the backward runs the same windows, adding each window's weight gradient into its
expert's slice (an in-place update of the loop carry). Data movement is one gather of x
into sorted order and K gathers back per token, forward and backward; no scatter-add.
Combine weights scale the hidden activations (F wide) before the down projection, so
their gradient is a dot over F and no [N, D] expert output is kept for the backward.
"""

from __future__ import annotations

import functools
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
  """W: half the balanced load N / E, rounded up to a multiple of 8, within [8, 256]."""
  half = -(-num_assignments // (2 * num_experts))
  return int(min(256, max(8, -(-half // 8) * 8)))


class Windows(NamedTuple):
  """The windows of one routing, in sorted order; entries past `num` are unused."""
  expert: jax.Array  # [max_windows] int32 expert whose weights window i uses
  start: jax.Array  # [max_windows] int32 first expert-sorted row of window i
  valid: jax.Array  # [max_windows] int32 rows of window i that hold an assignment
  num: jax.Array  # [] int32 windows this routing needs


def windows(asg: Assignments, rows: int, capacity: int | None = None) -> Windows:
  """The windows of `rows` rows over each expert's first min(count, capacity) assignments."""
  num_experts = asg.counts.shape[0]
  counts = asg.counts if capacity is None else jnp.minimum(asg.counts, capacity)  # [E]
  tiles = -(-counts // rows)  # [E]
  end = jnp.cumsum(tiles)
  max_windows = -(-asg.expert.shape[0] // rows) + num_experts
  i = jnp.arange(max_windows, dtype=jnp.int32)
  # Unused trailing entries map past the last expert: clamped, never run.
  expert = jnp.minimum(jnp.searchsorted(end, i, side="right"), num_experts - 1).astype(jnp.int32)
  first = (i - (end - tiles)[expert]) * rows  # rank of the window's first row
  return Windows(expert, asg.starts[expert] + first, jnp.clip(counts[expert] - first, 0, rows),
                 end[-1].astype(jnp.int32))


def _sorted_layout(x, weights, asg: Assignments, rows: int):
  """x rows [N + rows, D] and combine weights [N + rows] in expert-sorted order (zero-padded)."""
  top_k = asg.expert.shape[0] // x.shape[0]
  order = jnp.pad(asg.order, (0, rows), constant_values=asg.order.shape[0])  # N: padding
  tok = order // top_k  # a padding row reads token T: filled with zeros
  xs = jnp.take(x, tok, axis=0, mode="fill", fill_value=0)
  ws = jnp.take(weights, order, axis=0, mode="fill", fill_value=0)
  return xs, ws


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def routed_swiglu(rows: int, capacity: int | None, x, weights, asg: Assignments, w_gate, w_up,
                  w_down):
  """y [T, D] = sum_k weights[t*K + k] * SwiGLU_{expert}(x[t]) over windows of `rows` rows.

  capacity: None (dropless) or C: an expert's assignments of rank >= C contribute 0.
  weights: [N] combine weight per assignment; asg: sort_assignments(...);
  w_gate, w_up [E, D, F]; w_down [E, F, D].
  """
  return _forward(rows, capacity, x, weights, asg, w_gate, w_up, w_down)[0]


def _forward(rows, capacity, x, weights, asg, w_gate, w_up, w_down):
  win = windows(asg, rows, capacity)
  xs, ws = _sorted_layout(x, weights, asg, rows)  # [N + rows, D], [N + rows]
  lane = jnp.arange(rows, dtype=jnp.int32)

  def body(i, carry):
    ys, pre_a, pre_b = carry
    e, s = win.expert[i], win.start[i]
    xw = jax.lax.dynamic_slice_in_dim(xs, s, rows)  # [rows, D]
    ww = jnp.where(lane < win.valid[i], jax.lax.dynamic_slice_in_dim(ws, s, rows), 0)
    a = xw @ w_gate[e]  # [rows, F]
    b = xw @ w_up[e]
    y = (jax.nn.silu(a) * b * ww[:, None]) @ w_down[e]  # [rows, D]
    put = lambda table, value: jax.lax.dynamic_update_slice_in_dim(table, value, s, 0)
    return put(ys, y), put(pre_a, a), put(pre_b, b)

  n_rows, hidden = xs.shape[0], w_gate.shape[2]
  zeros = lambda width: jnp.zeros((n_rows, width), x.dtype)
  ys, pre_a, pre_b = jax.lax.fori_loop(0, win.num, body,
                                       (zeros(x.shape[1]), zeros(hidden), zeros(hidden)))
  y = _gather_back(ys, asg, x.shape[0])
  return y, (x, weights, asg, w_gate, w_up, w_down, pre_a, pre_b)


def _gather_back(table, asg: Assignments, num_tokens: int):
  """[N + rows, X] expert-sorted rows -> [T, X]: each token's sum over its K rows."""
  top_k = asg.expert.shape[0] // num_tokens
  inv = (asg.starts[asg.expert] + asg.rank).reshape(num_tokens, top_k)  # sorted row of (t, k)
  out = table[inv[:, 0]]
  for k in range(1, top_k):
    out = out + table[inv[:, k]]
  return out


def _backward(rows, capacity, saved, dy):
  x, weights, asg, w_gate, w_up, w_down, pre_a, pre_b = saved
  win = windows(asg, rows, capacity)
  xs, ws = _sorted_layout(x, weights, asg, rows)
  dys, _ = _sorted_layout(dy, weights, asg, rows)  # [N + rows, D]
  lane = jnp.arange(rows, dtype=jnp.int32)

  def body(i, carry):
    dxs, dws, dw_gate, dw_up, dw_down = carry
    e, s = win.expert[i], win.start[i]
    keep = (lane < win.valid[i])[:, None]  # [rows, 1]
    take = lambda table: jax.lax.dynamic_slice_in_dim(table, s, rows)
    xw = jnp.where(keep, take(xs), 0)  # [rows, D]
    dyw = jnp.where(keep, take(dys), 0)
    ww = take(ws)[:, None]
    a, b = take(pre_a), take(pre_b)  # [rows, F]
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = silu * b
    g = dyw @ w_down[e].T  # d loss / d (weighted h): [rows, F]
    dh = g * ww
    da = dh * b * sig * (1 + a * (1 - sig))  # silu'(a) = sig * (1 + a * (1 - sig))
    db = dh * silu
    dx = da @ w_gate[e].T + db @ w_up[e].T  # [rows, D]
    put = lambda table, value: jax.lax.dynamic_update_slice_in_dim(table, value, s, 0)
    add = lambda table, value: table.at[e].add(value)
    return (put(dxs, dx), put(dws, jnp.sum(g * h, axis=-1)),
            add(dw_gate, xw.T @ da), add(dw_up, xw.T @ db), add(dw_down, (h * ww).T @ dyw))

  init = (jnp.zeros_like(xs), jnp.zeros_like(ws), jnp.zeros_like(w_gate), jnp.zeros_like(w_up),
          jnp.zeros_like(w_down))
  dxs, dws, dw_gate, dw_up, dw_down = jax.lax.fori_loop(0, win.num, body, init)
  dx = _gather_back(dxs, asg, x.shape[0])
  inv = asg.starts[asg.expert] + asg.rank  # [N] sorted row of each assignment
  return dx, dws[inv], None, dw_gate, dw_up, dw_down


routed_swiglu.defvjp(_forward, _backward)
