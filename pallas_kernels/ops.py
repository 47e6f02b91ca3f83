"""Differentiable ops: the custom-VJP wiring of the grouped matmul and flash attention."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import attention
from pallas_kernels import gmm as gmm_lib

# --- grouped matmul -----------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _grouped_matmul(lhs, rhs, group_sizes, tiling, preferred_element_type, backend, interpret):
  return gmm_lib.gmm(lhs, rhs, group_sizes, tiling=tiling,
                     preferred_element_type=preferred_element_type, backend=backend,
                     interpret=interpret)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, tiling, preferred_element_type, backend, interpret):
  out = _grouped_matmul(lhs, rhs, group_sizes, tiling, preferred_element_type, backend, interpret)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(tiling, preferred_element_type, backend, interpret, residuals, grad):
  del preferred_element_type
  lhs, rhs, group_sizes = residuals
  grad = grad.astype(lhs.dtype)  # [m, n]
  # d lhs[r] = grad[r] @ rhs[g(r)].T: the same kernel with the weights transposed in-tile.
  d_lhs = gmm_lib.gmm(grad, rhs, group_sizes, tiling=tiling, preferred_element_type=lhs.dtype,
                      transpose_rhs=True, backend=backend, interpret=interpret)
  # d rhs[g] = lhs[rows of g].T @ grad[rows of g].
  d_rhs = gmm_lib.tgmm(lhs, grad, group_sizes, tiling=tiling, preferred_element_type=rhs.dtype,
                       backend=backend, interpret=interpret)
  return d_lhs, d_rhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    lhs: jax.Array,  # [m, k]
    rhs: jax.Array,  # [num_groups, k, n]
    group_sizes: jax.Array,  # [num_groups] int32
    *,
    tiling: gmm_lib.GmmTiling | None = None,
    preferred_element_type: Any = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Differentiable (wrt lhs and rhs) grouped matmul -> [m, n]; see `gmm.gmm` for arguments."""
  gmm_lib.validate_args(lhs, rhs, group_sizes, rhs_name="rhs")  # fail before tracing any kernel
  if preferred_element_type is not None:
    preferred_element_type = jnp.dtype(preferred_element_type)
  return _grouped_matmul(lhs, rhs, group_sizes, tiling, preferred_element_type, backend, interpret)


# --- flash attention ----------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash_attention(q, k, v, segment_ids, group_ids, scale, block_sizes, backend, interpret):
  out, _ = attention.flash_attention_fwd(q, k, v, segment_ids, group_ids, scale=scale,
                                         block_sizes=block_sizes, backend=backend,
                                         interpret=interpret)
  return out


def _flash_attention_fwd(q, k, v, segment_ids, group_ids, scale, block_sizes, backend, interpret):
  out, lse = attention.flash_attention_fwd(q, k, v, segment_ids, group_ids, scale=scale,
                                           block_sizes=block_sizes, backend=backend,
                                           interpret=interpret)
  return out, (q, k, v, segment_ids, group_ids, out, lse)


def _flash_attention_bwd(scale, block_sizes, backend, interpret, residuals, d_out):
  q, k, v, segment_ids, group_ids, out, lse = residuals
  dq, dk, dv = attention.flash_attention_bwd(q, k, v, segment_ids, group_ids, out, lse, d_out,
                                             scale=scale, block_sizes=block_sizes,
                                             backend=backend, interpret=interpret)
  return dq, dk, dv, None, None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def flash_attention(
    q: jax.Array,  # [batch, seq, num_heads, head_dim]
    k: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, num_kv_heads, head_dim]
    segment_ids: jax.Array | None = None,  # [batch, seq] int32
    group_ids: jax.Array | None = None,  # [batch, seq] int32
    *,
    scale: float | None = None,
    block_sizes: attention.BlockSizes | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Differentiable (wrt q, k, v) flash attention -> [batch, seq, num_heads, head_dim].

  Mask: seg[i] == seg[j] and (j <= i or (grp[i] == grp[j] and grp[i] != 0));
  missing ids mean one segment / no group (plain causal). A fully
  bidirectional mask is group_ids = 1 everywhere. `scale` defaults to
  1 / sqrt(head_dim); `backend` "auto" lowers Mosaic on TPU, Triton on GPU.
  """
  attention.validate_args(q, k, v, segment_ids, group_ids)  # fail before tracing any kernel
  segment_ids, group_ids = attention.default_ids(q, segment_ids, group_ids)
  scale = None if scale is None else float(scale)
  return _flash_attention(q, k, v, segment_ids, group_ids, scale, block_sizes, backend, interpret)
