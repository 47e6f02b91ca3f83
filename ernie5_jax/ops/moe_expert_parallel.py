"""Expert parallelism: routed experts sharded over devices, tokens exchanged by all-to-all.

The MoE layer's global view is kept (ops/moe_dispatch.expert_ffn); inside `jax.shard_map`
each device holds T_l tokens (its batch rows) and E_l = E / n of the experts, n being the
expert shards (GShard, arXiv 2006.16668, Sec. 3.2; DeepSeek-V3, arXiv 2412.19437, Sec. 3.4):

  1. sort its T_l * K assignments by destination shard (e // E_l) into an [n, C, D] send
     buffer: C rows per destination, in token order; rows past C are dropped (capacity);
  2. `lax.all_to_all` over the expert axis: row block s of the received [n, C, D] came
     from shard s, with each row's local expert id (-1 = padding);
  3. the local experts run on those n * C rows with the single-device dispatch (the
     backend that ops/backend.py picks: "gather" on CPU, Pallas grouped matmul on GPU/TPU);
  4. `lax.all_to_all` back, and each assignment's output is picked from its slot and
     weighted by its combine weight (0 if dropped); a hidden dimension split over tensor
     shards is summed by `psum`.

C = ceil(capacity_factor * T_l * K / n) (capacity_factor = config.mesh.expert_capacity_factor);
capacity_factor 0 makes C = T_l * K, which no routing can overflow (dropless, exact).
The router runs outside, in the global view, so its expert loads (aux-loss-free balancing)
are sums over the global batch already.

Dropless on TPU/GPU (ops/backend.ragged_exchange): steps 1-2 and 4 use
`jax.lax.ragged_all_to_all` instead (the exchange MaxText uses): each device sends exactly
its rows for each shard, sorted by destination, and the receivers place them contiguously
in sender order (`ragged_plan` computes the offsets with three small all-to-alls). Only
real rows travel; the receive buffer still has room for the worst case (n * T_l * K rows,
as the padded dropless exchange), but its unused tail is assigned to no expert, so the
grouped matmul skips it.
XLA:CPU has no ragged all-to-all (jax 0.10.2), so the CPU tests run this path with
`emulated_ragged_all_to_all` (same semantics, built from the padded all-to-all) against the
single-device dispatch, and the TPU compile (ernie5_jax/aot) checks the real collective.

Both shard_maps run with check_vma=False: the single-device dispatch holds custom VJPs and
Pallas kernels, whose interpreter (CPU) does not track varying mesh axes. Gradients are
then summed the classic way: an input's cotangent is psum'd over the mesh axes its spec
does not mention (weights over the token shards outside the expert axes, rows over the
tensor shards holding slices of F), the tests' reference being the one-device dispatch.

Without an expert split, `token_parallel_ffn` runs the single-device dispatch per token
shard inside `jax.shard_map` (Mosaic and Triton kernels cannot be partitioned by XLA; the
dispatch needs no communication between token shards).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ernie5_jax.ops import moe_windows

LocalFFN = Callable[..., jax.Array]  # expert_ffn's single-device signature, backend bound.
# jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
# recv_sizes, *, axis_name) or emulated_ragged_all_to_all.
RaggedExchange = Callable[..., jax.Array]


def exchange_rows(local_assignments: int, num_shards: int, capacity_factor: float) -> int:
  """C, the rows each device sends to each expert shard (module doc); static."""
  if capacity_factor == 0:
    return local_assignments
  rows = math.ceil(capacity_factor * local_assignments / num_shards)
  return max(1, min(local_assignments, rows))


def expert_parallel_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *, mesh: Mesh,
                        token_axes: Sequence[str], expert_axes: Sequence[str],
                        hidden_axes: Sequence[str], capacity_factor: float,
                        local_ffn: LocalFFN,
                        ragged_exchange: RaggedExchange | None = None) -> jax.Array:
  """expert_ffn's y [tokens, d_model] with experts split over expert_axes (module doc).

  Args:
    x: [tokens, d_model]; expert_ids, combine_weights: [tokens, top_k] (global views).
    w_gate, w_up: [E, d_model, F]; w_down: [E, F, d_model].
    mesh: the device mesh; token_axes: mesh axes splitting the tokens (contain expert_axes);
      expert_axes: mesh axes splitting E; hidden_axes: mesh axes splitting F (summed).
    capacity_factor: see exchange_rows (0 = dropless).
    local_ffn: fn(x, expert_ids, combine_weights, w_gate, w_up, w_down) -> y, one device.
    ragged_exchange: with capacity_factor 0, exchange only the real rows with this
      (jax.lax.ragged_all_to_all's signature; module doc); None: the padded exchange.
  """
  token_axes, expert_axes, hidden_axes = tuple(token_axes), tuple(expert_axes), tuple(hidden_axes)
  num_shards = math.prod(mesh.shape[a] for a in expert_axes)
  token_shards = math.prod(mesh.shape[a] for a in token_axes)
  num_experts, tokens = w_gate.shape[0], x.shape[0]
  if not set(expert_axes) <= set(token_axes):
    raise ValueError(f"expert_axes={expert_axes} is not accepted: expected mesh axes that "
                     f"also split the tokens ({token_axes})")
  if num_experts % num_shards:
    raise ValueError(f"num_experts={num_experts} is not accepted: expected a multiple of the "
                     f"expert shards {num_shards} (mesh axes {expert_axes})")
  if tokens % token_shards:
    raise ValueError(f"tokens={tokens} is not accepted: expected a multiple of the token "
                     f"shards {token_shards} (mesh axes {token_axes})")
  ep = expert_axes[0] if len(expert_axes) == 1 else expert_axes
  tok = PartitionSpec(token_axes, None)
  hid = hidden_axes or None
  if ragged_exchange is not None and capacity_factor == 0:
    body = _ragged_body(num_shards=num_shards, ep_axis=ep, hidden_axes=hidden_axes,
                        local_ffn=local_ffn, exchange=ragged_exchange)
  else:
    body = _shard_body(num_shards=num_shards, ep_axis=ep, hidden_axes=hidden_axes,
                       capacity_factor=capacity_factor, local_ffn=local_ffn)
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok, tok, tok, PartitionSpec(expert_axes, None, hid),
                PartitionSpec(expert_axes, None, hid), PartitionSpec(expert_axes, hid, None)),
      out_specs=tok, check_vma=False)(x, expert_ids, combine_weights, w_gate, w_up, w_down)


def _shard_body(*, num_shards: int, ep_axis, hidden_axes: tuple[str, ...],
                capacity_factor: float, local_ffn: LocalFFN):
  """The per-device program of expert_parallel_ffn (module doc, steps 1-4)."""

  def body(x, expert_ids, combine_weights, w_gate, w_up, w_down):
    # x [T_l, D]; expert_ids, combine_weights [T_l, K]; w_* hold this shard's E_l experts.
    tokens, top_k = expert_ids.shape
    local_experts = w_gate.shape[0]
    n = tokens * top_k
    rows = exchange_rows(n, num_shards, capacity_factor)  # C
    dest = expert_ids // local_experts  # [T_l, K] destination shard
    asg = moe_windows.sort_assignments(dest, num_shards)  # by destination, token order kept
    # 1. Send buffer: slot (d, c) holds the c-th assignment bound for shard d.
    c = jnp.arange(rows, dtype=jnp.int32)
    valid = c[None, :] < asg.counts[:, None]  # [n_shards, C]
    src = asg.order[jnp.minimum(asg.starts[:, None] + c[None, :], n - 1)]  # [n_shards, C]
    send_tok = jnp.where(valid, src // top_k, tokens)  # `tokens` = the zero fill row
    x_send = jnp.take(x, send_tok.reshape(-1), axis=0, mode="fill", fill_value=0)
    e_send = jnp.where(valid, (expert_ids % local_experts).reshape(-1)[src], -1)
    # 2. Exchange: block s of what arrives was sent by shard s.
    to_experts = lambda a: jax.lax.all_to_all(a, ep_axis, 0, 0, tiled=True)
    x_recv = to_experts(x_send)  # [n_shards * C, D]
    e_recv = to_experts(e_send.reshape(-1))  # [n_shards * C]
    # 3. Local experts; padding rows (x = 0, weight 0) are spread over the experts so that
    # the local dispatch layout stays balanced.
    real = e_recv >= 0
    spread = jnp.arange(e_recv.shape[0], dtype=jnp.int32) % local_experts
    row_weight = real.astype(x.dtype)[:, None]
    y_recv = local_ffn(x_recv, jnp.where(real, e_recv, spread)[:, None], row_weight,
                       w_gate, w_up, w_down)
    # 4. Back to the senders, then each assignment's slot, weighted and summed over k.
    y_back = to_experts(y_recv)  # [n_shards * C, D], slot d * C + c as sent
    kept = asg.rank < rows  # [N]
    slot = jnp.where(kept, asg.expert * rows + asg.rank, 0).reshape(tokens, top_k)
    weights = jnp.where(kept.reshape(tokens, top_k), combine_weights, 0).astype(x.dtype)
    y = jnp.einsum("TKD,TK->TD", y_back[slot], weights)  # [T_l, D]
    if hidden_axes:  # Each tensor shard holds a slice of F: partial sums.
      y = jax.lax.psum(y, hidden_axes)
    return y

  return body


class RaggedPlan(NamedTuple):
  """Offsets and sizes of one device's ragged exchange (jax.lax.ragged_all_to_all's terms)."""
  input_offsets: jax.Array  # [n] int32: where the rows for shard r start in the send buffer
  send_sizes: jax.Array  # [n] int32: rows for shard r
  output_offsets: jax.Array  # [n] int32: where they land in shard r's receive buffer
  recv_sizes: jax.Array  # [n] int32: rows arriving from shard s
  recv_offsets: jax.Array  # [n] int32: where they land in this device's receive buffer
  sent_from: jax.Array  # [n] int32: where shard s had them in its send buffer


def ragged_plan(counts: jax.Array, transpose: Callable[[jax.Array], jax.Array]) -> RaggedPlan:
  """The ragged exchange of rows sorted by destination, `counts` [n] per destination shard.

  Receivers place what arrives contiguously in sender order. transpose(a [n]) returns, on
  each device, entry `me` of every device's a (the tiled all-to-all over the expert axis).
  """
  counts = counts.astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts  # [n] exclusive prefix sums
  recv_sizes = transpose(counts)
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
  return RaggedPlan(input_offsets=starts, send_sizes=counts,
                    output_offsets=transpose(recv_offsets), recv_sizes=recv_sizes,
                    recv_offsets=recv_offsets, sent_from=transpose(starts))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's result from the padded all-to-all (XLA:CPU lacks the former).

  Each slice is padded to operand's length, exchanged, and written at its offset. For tests.
  """
  rows = operand.shape[0]
  c = jnp.arange(rows, dtype=jnp.int32)
  src = input_offsets[:, None] + c[None, :]  # [n, rows]
  valid = c[None, :] < send_sizes[:, None]
  padded = jnp.take(operand, jnp.where(valid, src, rows).reshape(-1), axis=0, mode="fill",
                    fill_value=0)  # [n * rows, ...]
  swap = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
  received = swap(padded)  # block s: what shard s sent here
  where = swap(output_offsets)[:, None] + c[None, :]  # [n, rows]
  where = jnp.where(c[None, :] < recv_sizes[:, None], where, output.shape[0])
  return output.at[where.reshape(-1)].set(received, mode="drop")


def _ragged_body(*, num_shards: int, ep_axis, hidden_axes: tuple[str, ...],
                 local_ffn: LocalFFN, exchange: RaggedExchange):
  """The per-device program of the dropless ragged exchange (module doc)."""

  def body(x, expert_ids, combine_weights, w_gate, w_up, w_down):
    # x [T_l, D]; expert_ids, combine_weights [T_l, K]; w_* hold this shard's E_l experts.
    tokens, top_k = expert_ids.shape
    local_experts = w_gate.shape[0]
    n = tokens * top_k
    asg = moe_windows.sort_assignments(expert_ids // local_experts, num_shards)
    plan = ragged_plan(asg.counts,
                       lambda a: jax.lax.all_to_all(a, ep_axis, 0, 0, tiled=True))
    send = functools.partial(exchange, axis_name=ep_axis)
    x_send = x[asg.order // top_k]  # [N, D] by destination shard, token order within
    e_send = (expert_ids % local_experts).reshape(-1)[asg.order]  # [N]
    capacity = num_shards * n  # every shard could send all of its assignments here
    args = (plan.input_offsets, plan.send_sizes, plan.output_offsets, plan.recv_sizes)
    x_recv = send(x_send, jnp.zeros((capacity, x.shape[1]), x.dtype), *args)
    e_recv = send(e_send, jnp.full((capacity,), -1, jnp.int32), *args)
    # Real rows are a prefix of the buffer. The rest get expert id E_l ("no expert"): the
    # single-device dispatch sorts them past every group (the grouped matmul only writes
    # zeros there), so the worst-case buffer costs memory, not expert FLOPs.
    real = jnp.arange(capacity) < jnp.sum(plan.recv_sizes)
    y_recv = local_ffn(x_recv, jnp.where(real, e_recv, local_experts)[:, None],
                       real.astype(x.dtype)[:, None], w_gate, w_up, w_down)  # [capacity, D]
    # Back to where each row was in its sender's send buffer.
    y_sorted = send(y_recv, jnp.zeros((n, x.shape[1]), y_recv.dtype), plan.recv_offsets,
                    plan.recv_sizes, plan.sent_from, plan.send_sizes)  # [N, D]
    position = (asg.starts[asg.expert] + asg.rank).reshape(tokens, top_k)
    y = jnp.einsum("TKD,TK->TD", y_sorted[position], combine_weights.astype(x.dtype))
    if hidden_axes:  # Each tensor shard holds a slice of F: partial sums.
      y = jax.lax.psum(y, hidden_axes)
    return y

  return body


def token_parallel_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *, mesh: Mesh,
                       token_axes: Sequence[str], hidden_axes: Sequence[str],
                       local_ffn: LocalFFN) -> jax.Array:
  """expert_ffn's y [tokens, d_model] with every expert on every device, tokens split.

  Args as expert_parallel_ffn; local_ffn runs once per token shard (module doc).
  """
  token_axes, hidden_axes = tuple(token_axes), tuple(hidden_axes)
  tok = PartitionSpec(token_axes or None, None)
  hid = hidden_axes or None

  def body(x, expert_ids, combine_weights, w_gate, w_up, w_down):
    y = local_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down)
    return jax.lax.psum(y, hidden_axes) if hidden_axes else y

  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok, tok, tok, PartitionSpec(None, None, hid), PartitionSpec(None, None, hid),
                PartitionSpec(None, hid, None)),
      out_specs=tok, check_vma=False)(x, expert_ids, combine_weights, w_gate, w_up, w_down)


def dropped_assignments(expert_ids, num_experts: int, *, token_shards: int, num_shards: int,
                        capacity_factor: float) -> jax.Array:
  """[tokens, top_k] bool: the assignments expert_parallel_ffn drops (global view).

  The tokens are split in token_shards contiguous blocks, as in the shard_map; an
  assignment is dropped when C earlier ones of its block go to the same expert shard.
  For metrics and tests.
  """
  tokens, top_k = expert_ids.shape
  n = tokens // token_shards * top_k
  rows = exchange_rows(n, num_shards, capacity_factor)
  dest = (expert_ids // (num_experts // num_shards)).reshape(token_shards, n)
  onehot = jax.nn.one_hot(dest, num_shards, dtype=jnp.int32)  # [blocks, n, shards]
  rank = jnp.sum((jnp.cumsum(onehot, axis=1) - onehot) * onehot, axis=-1)  # [blocks, n]
  return (rank >= rows).reshape(tokens, top_k)
