"""The one place where the platform picks a compute backend for an op.

Config fields `model.moe_dispatch` and `model.attention` name a backend or
"auto"; "auto" is decided here from the target platform: the Pallas kernels
(`pallas_kernels/`) on TPU and GPU, the fast XLA paths on CPU. A Pallas backend
named explicitly on CPU runs its kernels in interpret mode (slow; for tests).
The target platform is, in this order: the `platform` argument, the active layout's
(`sharding.Layout.platform`: the mesh devices' platform, or the target of an
ahead-of-time compile from a CPU host, ernie5_jax/aot), `jax.default_backend()`.
The dropless expert-parallel exchange is chosen here too (`ragged_exchange`).
"""

from __future__ import annotations

import jax

from ernie5_jax import sharding
from ernie5_jax.config import ATTENTION_BACKENDS, MOE_DISPATCH_BACKENDS


def target_platform(platform: str | None = None) -> str:
  """The platform code is traced for: `platform`, else the active layout's, else the default."""
  if platform is not None:
    return platform
  layout = sharding.active_layout()
  if layout is not None and layout.platform is not None:
    return layout.platform
  return jax.default_backend()


def resolve_moe_backend(name: str, platform: str | None = None) -> str:
  """Maps a `model.moe_dispatch` value to a concrete MoE dispatch backend.

  "auto" is "gather" on CPU (`jax.lax.ragged_dot` is ~30-70x slower than a dense
  matmul of the same FLOPs there) and "pallas" (grouped matmul kernel) on GPU/TPU;
  explicit names pass through. `platform` defaults to `target_platform()`.
  """
  if name not in MOE_DISPATCH_BACKENDS:
    raise ValueError(f"backend={name!r} is not accepted: expected one of {MOE_DISPATCH_BACKENDS}")
  if name != "auto":
    return name
  return "gather" if target_platform(platform) == "cpu" else "pallas"


def resolve_attention_backend(name: str, platform: str | None = None) -> str:
  """Maps a `model.attention` value to "xla" or "pallas" ("auto": pallas off CPU)."""
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f"attention backend={name!r} is not accepted: expected one of "
                     f"{ATTENTION_BACKENDS}")
  if name != "auto":
    return name
  return "xla" if target_platform(platform) == "cpu" else "pallas"


def pallas_interpret(platform: str | None = None) -> bool:
  """Whether Pallas kernels must run in interpret mode (CPU has no Pallas lowering)."""
  return target_platform(platform) == "cpu"


def ragged_exchange(platform: str | None = None):
  """The dropless expert-parallel exchange: jax.lax.ragged_all_to_all off CPU, else None.

  None selects the padded all-to-all (ops/moe_expert_parallel.py): XLA:CPU does not
  implement the ragged one (jax 0.10.2).
  """
  return None if target_platform(platform) == "cpu" else jax.lax.ragged_all_to_all
