"""The one place where the platform picks a compute backend for an op."""

from __future__ import annotations

import jax

from ernie5_jax.config import MOE_DISPATCH_BACKENDS


def resolve_moe_backend(name: str, platform: str | None = None) -> str:
  """Maps a `model.moe_dispatch` value to a concrete MoE dispatch backend.

  "auto" is "gather" on CPU (`jax.lax.ragged_dot` is ~30-70x slower than a dense
  matmul of the same FLOPs there) and "ragged_dot" on GPU/TPU; explicit names
  pass through. `platform` defaults to `jax.default_backend()`.
  """
  if name not in MOE_DISPATCH_BACKENDS:
    raise ValueError(f"backend={name!r} is not accepted: expected one of {MOE_DISPATCH_BACKENDS}")
  if name != "auto":
    return name
  platform = jax.default_backend() if platform is None else platform
  return "gather" if platform == "cpu" else "ragged_dot"
