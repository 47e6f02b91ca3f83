"""Pallas kernels for ernie5_jax: grouped matmul (MoE dispatch) and flash attention.

Differentiable entry points (what the ops layer calls):
  grouped_matmul(lhs [m, k], rhs [G, k, n], group_sizes [G]) -> [m, n]
  flash_attention(q [B, S, H, D], k, v [B, S, KV, D], segment_ids, group_ids) -> [B, S, H, D]

Kernels and references: `pallas_kernels.gmm` (gmm, tgmm, gmm_reference,
tgmm_reference, GmmTiling) and `pallas_kernels.attention` (flash_attention_fwd,
flash_attention_bwd, attention_reference, BlockSizes). Every kernel has a
Mosaic (TPU) and a Triton (GPU) body; `backend="auto"` picks by the lowering
platform, `interpret=True` runs them on CPU.
"""

from pallas_kernels.attention import attention_reference
from pallas_kernels.attention import BlockSizes
from pallas_kernels.gmm import gmm_reference
from pallas_kernels.gmm import GmmTiling
from pallas_kernels.gmm import tgmm_reference
from pallas_kernels.ops import flash_attention
from pallas_kernels.ops import grouped_matmul

__all__ = [
    "BlockSizes",
    "GmmTiling",
    "attention_reference",
    "flash_attention",
    "gmm_reference",
    "grouped_matmul",
    "tgmm_reference",
]
