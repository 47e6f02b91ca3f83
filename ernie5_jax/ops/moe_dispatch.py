"""MoE expert dispatch: y[t] = sum_k w[t, k] * SwiGLU_{e[t, k]}(x[t]).

SwiGLU_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]  (Shazeer 2020, arXiv 2002.05202).

Backends (`backend=`; "auto" is resolved by ops.backend.resolve_moe_backend):
- "gather": dropless, the fast CPU path (ops/moe_windows.py): assignments sorted
  by expert into tiles of W rows, one loop per window size (8, 4, 2, 1 tiles) over
  the windows the routing needs, with the expert's weights: exact for any routing,
  padding < one tile per busy expert.
- "ragged_dot": dropless; sort by expert, `jax.lax.ragged_dot` grouped matmuls,
  unsort (the XLA path for GPU/TPU; ~30-70x slower than dense on CPU).
- "pallas": dropless; the same sort / unsort around `pallas_kernels.grouped_matmul`
  (Mosaic on TPU, Triton on GPU, interpret mode on CPU: see ops/backend.py).
- "capacity": token dropping with C = ceil(capacity_factor * T*K / E) rows per
  expert (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961): assignments past
  C, in token order, contribute 0 (the "gather" windows over ranks < C). For comparison.
Under an active layout (sharding.use_layout) the dispatch runs per device inside
`jax.shard_map` (ops/moe_expert_parallel.py): where the layout splits the experts, tokens
travel to their experts by all-to-all and each device runs the backend above on its own
experts; else each token shard runs it on its own tokens (a "capacity" then counts per
shard, as under expert parallelism).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

import pallas_kernels
from ernie5_jax import sharding
from ernie5_jax.ops import moe_expert_parallel, moe_windows
from ernie5_jax.ops.backend import pallas_interpret, ragged_exchange, resolve_moe_backend


def expert_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *,
               backend: str = "auto", capacity_factor: float = 1.25):
  """Routed SwiGLU experts: y[t] = sum_k combine_weights[t, k] * SwiGLU_{expert_ids[t, k]}(x[t]).

  Args:
    x: [tokens, d_model] activations.
    expert_ids: [tokens, top_k] int expert choices in [0, E); E (with combine weight 0) is
      "no expert": the row costs no expert FLOPs on the grouped backends and gives 0
      (the unused tail of the ragged exchange's buffer, ops/moe_expert_parallel.py).
    combine_weights: [tokens, top_k] combine weights.
    w_gate, w_up: [E, d_model, expert_hidden]; w_down: [E, expert_hidden, d_model].
    backend: one of config.MOE_DISPATCH_BACKENDS ("auto" picks per platform).
    capacity_factor: per-expert capacity / (tokens * top_k / E); "capacity" only.
  Returns:
    y: [tokens, d_model] in x.dtype.
  """
  _check_shapes(x, expert_ids, combine_weights, w_gate, w_up, w_down)
  backend = resolve_moe_backend(backend)
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r} is not accepted: "
                     "expected a value > 0")
  local = functools.partial(_single_device_ffn, backend=backend,
                            capacity_factor=capacity_factor)
  layout = sharding.active_layout()
  if layout is None:
    return local(x, expert_ids, combine_weights, w_gate, w_up, w_down)
  token_axes, expert_axes = layout.axes(sharding.BATCH), layout.axes("expert")
  # A hidden split over shards that hold other tokens cannot be summed: those gather F.
  hidden_axes = [a for a in layout.axes("expert_mlp") if a not in token_axes]
  if expert_axes:
    return moe_expert_parallel.expert_parallel_ffn(
        x, expert_ids, combine_weights, w_gate, w_up, w_down, mesh=layout.mesh,
        token_axes=token_axes, expert_axes=expert_axes, hidden_axes=hidden_axes,
        capacity_factor=layout.expert_capacity_factor, local_ffn=local,
        ragged_exchange=ragged_exchange())
  token_axes = layout.dividing_axes(sharding.BATCH, x.shape[0])  # one decoded token: whole
  if not token_axes and not hidden_axes:
    return local(x, expert_ids, combine_weights, w_gate, w_up, w_down)
  return moe_expert_parallel.token_parallel_ffn(
      x, expert_ids, combine_weights, w_gate, w_up, w_down, mesh=layout.mesh,
      token_axes=token_axes, hidden_axes=hidden_axes, local_ffn=local)


def _single_device_ffn(x, expert_ids, combine_weights, w_gate, w_up, w_down, *, backend: str,
                       capacity_factor: float):
  """expert_ffn on one device with a resolved backend (module doc)."""
  dtype = x.dtype
  w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
  weights = combine_weights.astype(dtype).reshape(-1)  # [N], n = t*K + k
  num_experts = w_gate.shape[0]
  asg = moe_windows.sort_assignments(expert_ids, num_experts)
  num_assignments = weights.shape[0]
  if backend == "ragged_dot":
    return _grouped_ffn(jax.lax.ragged_dot, x, weights, asg, w_gate, w_up, w_down)
  if backend == "pallas":
    gmm = functools.partial(pallas_kernels.grouped_matmul, interpret=pallas_interpret())
    return _grouped_ffn(gmm, x, weights, asg, w_gate, w_up, w_down)
  capacity = None
  if backend == "capacity":
    capacity = max(1, math.ceil(capacity_factor * num_assignments / num_experts))
  rows = moe_windows.window_rows(num_assignments, num_experts)
  if capacity is not None:
    rows = min(rows, -(-capacity // 8) * 8)
  return moe_windows.routed_swiglu(rows, capacity, x, weights, asg, w_gate, w_up, w_down)


def _check_shapes(x, expert_ids, combine_weights, w_gate, w_up, w_down):
  """Raises ValueError naming the argument whose shape or dtype does not fit."""
  if x.ndim != 2:
    raise ValueError(f"x.shape={x.shape} is not accepted: expected [tokens, d_model]")
  tokens, d_model = x.shape
  if expert_ids.ndim != 2 or expert_ids.shape[0] != tokens:
    raise ValueError(f"expert_ids.shape={expert_ids.shape} is not accepted: expected "
                     f"[tokens={tokens}, top_k]")
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(f"expert_ids.dtype={expert_ids.dtype} is not accepted: "
                     "expected an integer dtype")
  if combine_weights.shape != expert_ids.shape:
    raise ValueError(f"combine_weights.shape={combine_weights.shape} is not accepted: expected "
                     f"expert_ids.shape={expert_ids.shape}")
  if w_gate.ndim != 3 or w_gate.shape[1] != d_model:
    raise ValueError(f"w_gate.shape={w_gate.shape} is not accepted: expected "
                     f"[num_experts, d_model={d_model}, expert_hidden]")
  num_experts, _, hidden = w_gate.shape
  if w_up.ndim == w_down.ndim == 3 and w_up.shape[0] == w_down.shape[0] != num_experts:
    raise ValueError(f"w_gate.shape={w_gate.shape} is not accepted: expected num_experts="
                     f"{w_up.shape[0]} like w_up.shape={w_up.shape} and "
                     f"w_down.shape={w_down.shape}")
  if w_up.shape != w_gate.shape:
    raise ValueError(f"w_up.shape={w_up.shape} is not accepted: "
                     f"expected w_gate.shape={w_gate.shape}")
  if w_down.shape != (num_experts, hidden, d_model):
    raise ValueError(f"w_down.shape={w_down.shape} is not accepted: expected "
                     f"[num_experts={num_experts}, expert_hidden={hidden}, d_model={d_model}]")


# --- "ragged_dot" / "pallas": sort, grouped matmuls, unsort ----------------------
# The sort and unsort are gathers whose transposes are again gathers (through the
# inverse permutation), so the backward pass has no scatter-add.


def _inverse(asg):
  """[N] expert-sorted position of each assignment (the inverse of asg.order)."""
  return asg.starts[asg.expert] + asg.rank


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dispatch(x, asg, top_k):
  """x [T, D] -> expert-sorted rows xs [N, D] (each token once per chosen expert)."""
  return x[asg.order // top_k]


def _dispatch_fwd(x, asg, top_k):
  return _dispatch(x, asg, top_k), asg


def _dispatch_bwd(top_k, asg, dxs):
  inv = _inverse(asg).reshape(-1, top_k)  # [T, K]
  dx = dxs[inv[:, 0]]
  for k in range(1, top_k):
    dx = dx + dxs[inv[:, k]]
  return dx, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(ys, weights, asg, top_k):
  """Expert-sorted outputs ys [N, D] -> y[t] = sum_k weights[t*K + k] * ys[inverse[t, k]]."""
  inv = _inverse(asg).reshape(-1, top_k)
  w = weights.reshape(-1, top_k)
  y = ys[inv[:, 0]] * w[:, :1]
  for k in range(1, top_k):
    y = y + ys[inv[:, k]] * w[:, k:k + 1]
  return y


def _combine_fwd(ys, weights, asg, top_k):
  return _combine(ys, weights, asg, top_k), (ys, weights, asg)


def _combine_bwd(top_k, res, dy):
  ys, weights, asg = res
  dys = dy[asg.order // top_k] * weights[asg.order][:, None]  # [N, D]
  inv = _inverse(asg).reshape(-1, top_k)  # [T, K]
  dweights = jnp.stack([jnp.sum(ys[inv[:, k]] * dy, axis=-1) for k in range(top_k)], axis=1)
  return dys, dweights.reshape(-1), None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _grouped_ffn(grouped_matmul, x, weights, asg, w_gate, w_up, w_down):
  """SwiGLU experts with grouped_matmul(lhs [N, k], rhs [E, k, n], group_sizes [E]) -> [N, n]."""
  top_k = weights.shape[0] // x.shape[0]
  xs = _dispatch(x, asg, top_k)  # [N, D] sorted by expert
  gate = grouped_matmul(xs, w_gate, asg.counts)  # [N, F]
  h = jax.nn.silu(gate) * grouped_matmul(xs, w_up, asg.counts)
  ys = grouped_matmul(h, w_down, asg.counts)  # [N, D]
  return _combine(ys, weights, asg, top_k)
