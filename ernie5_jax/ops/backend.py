"""The one place where the platform picks a compute backend for an op.

Config fields `model.moe_dispatch` and `model.attention` name a backend or
"auto"; "auto" is decided here from `jax.default_backend()`: the Pallas kernels
(`pallas_kernels/`) on TPU and GPU, the fast XLA paths on CPU. A Pallas backend
named explicitly on CPU runs its kernels in interpret mode (slow; for tests).
Expert parallelism is decided here too: under an active sharding layout that splits the
routed experts over devices, MoE dispatch exchanges tokens between them
(`expert_parallel_layout`), each device running the backend above on its own experts.
"""

from __future__ import annotations

import jax

from ernie5_jax import sharding
from ernie5_jax.config import ATTENTION_BACKENDS, MOE_DISPATCH_BACKENDS


def _platform(platform: str | None) -> str:
  return jax.default_backend() if platform is None else platform


def resolve_moe_backend(name: str, platform: str | None = None) -> str:
  """Maps a `model.moe_dispatch` value to a concrete MoE dispatch backend.

  "auto" is "gather" on CPU (`jax.lax.ragged_dot` is ~30-70x slower than a dense
  matmul of the same FLOPs there) and "pallas" (grouped matmul kernel) on GPU/TPU;
  explicit names pass through. `platform` defaults to `jax.default_backend()`.
  """
  if name not in MOE_DISPATCH_BACKENDS:
    raise ValueError(f"backend={name!r} is not accepted: expected one of {MOE_DISPATCH_BACKENDS}")
  if name != "auto":
    return name
  return "gather" if _platform(platform) == "cpu" else "pallas"


def resolve_attention_backend(name: str, platform: str | None = None) -> str:
  """Maps a `model.attention` value to "xla" or "pallas" ("auto": pallas off CPU)."""
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f"attention backend={name!r} is not accepted: expected one of "
                     f"{ATTENTION_BACKENDS}")
  if name != "auto":
    return name
  return "xla" if _platform(platform) == "cpu" else "pallas"


def pallas_interpret(platform: str | None = None) -> bool:
  """Whether Pallas kernels must run in interpret mode (CPU has no Pallas lowering)."""
  return _platform(platform) == "cpu"


def expert_parallel_layout() -> sharding.Layout | None:
  """The active layout (sharding.use_layout) if it splits routed experts over devices, else None.

  Then ops/moe_dispatch.expert_ffn exchanges tokens by all-to-all
  (ops/moe_expert_parallel.py): a mesh with expert > 1 and the default rules.
  """
  layout = sharding.active_layout()
  if layout is None or not layout.axes("expert"):
    return None
  return layout
