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
are sums over the global batch already. `jax.lax.ragged_all_to_all` would exchange only
real rows, but XLA:CPU does not implement it (checked with jax 0.10.2), so the padded
exchange is the one path here, and the one the CPU tests cover.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ernie5_jax.ops import moe_slots

LocalFFN = Callable[..., jax.Array]  # expert_ffn's single-device signature, backend bound.


def exchange_rows(local_assignments: int, num_shards: int, capacity_factor: float) -> int:
  """C, the rows each device sends to each expert shard (module doc); static."""
  if capacity_factor == 0:
    return local_assignments
  rows = math.ceil(capacity_factor * local_assignments / num_shards)
  return max(1, min(local_assignments, rows))


def expert_parallel_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *, mesh: Mesh,
                        token_axes: Sequence[str], expert_axes: Sequence[str],
                        hidden_axes: Sequence[str], capacity_factor: float,
                        local_ffn: LocalFFN) -> jax.Array:
  """expert_ffn's y [tokens, d_model] with experts split over expert_axes (module doc).

  Args:
    x: [tokens, d_model]; expert_ids, combine_weights: [tokens, top_k] (global views).
    w_gate, w_up: [E, d_model, F]; w_down: [E, F, d_model].
    mesh: the device mesh; token_axes: mesh axes splitting the tokens (contain expert_axes);
      expert_axes: mesh axes splitting E; hidden_axes: mesh axes splitting F (summed).
    capacity_factor: see exchange_rows (0 = dropless).
    local_ffn: fn(x, expert_ids, combine_weights, w_gate, w_up, w_down) -> y, one device.
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
  body = _shard_body(num_shards=num_shards, ep_axis=ep, hidden_axes=hidden_axes,
                     weight_vary_axes=tuple(a for a in token_axes if a not in expert_axes),
                     capacity_factor=capacity_factor, local_ffn=local_ffn)
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok, tok, tok, PartitionSpec(expert_axes, None, hid),
                PartitionSpec(expert_axes, None, hid), PartitionSpec(expert_axes, hid, None)),
      out_specs=tok)(x, expert_ids, combine_weights, w_gate, w_up, w_down)


def _shard_body(*, num_shards: int, ep_axis, hidden_axes: tuple[str, ...],
                weight_vary_axes: tuple[str, ...], capacity_factor: float, local_ffn: LocalFFN):
  """The per-device program of expert_parallel_ffn (module doc, steps 1-4)."""

  def body(x, expert_ids, combine_weights, w_gate, w_up, w_down):
    # x [T_l, D]; expert_ids, combine_weights [T_l, K]; w_* hold this shard's E_l experts.
    tokens, top_k = expert_ids.shape
    local_experts = w_gate.shape[0]
    n = tokens * top_k
    rows = exchange_rows(n, num_shards, capacity_factor)  # C
    dest = expert_ids // local_experts  # [T_l, K] destination shard
    asg = moe_slots.sort_assignments(dest, num_shards)  # by destination, token order kept
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
    # The single-device dispatch is a custom_vjp, whose cotangents must vary over the same
    # mesh axes as its inputs: rows vary over the tensor shards (which hold slices of F) and
    # weights over the token shards outside the expert axes (which hold other tokens).
    # pcast's transpose is the psum that sums those partial gradients.
    x_recv, row_weight = _vary((x_recv, real.astype(x.dtype)[:, None]), hidden_axes)
    w_gate, w_up, w_down = _vary((w_gate, w_up, w_down), weight_vary_axes)
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


def _vary(arrays, axes: tuple[str, ...]):
  """arrays (a tuple) marked as varying over mesh `axes` (jax.lax.pcast), if any."""
  return jax.lax.pcast(arrays, axes, to="varying") if axes else arrays


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
