"""Bad arguments raise ValueError naming the argument, before any Mosaic / Triton lowering."""

import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import attention
from pallas_kernels import gmm as gmm_lib


def _s(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _raises(match, fn, *args):
  """eval_shape traces without allocating or lowering: errors come from our checks."""
  with pytest.raises(ValueError, match=re.escape(match)):
    jax.eval_shape(fn, *args)


M, K, N, G = 64, 32, 16, 4


SIZES = _s((G,), jnp.int32)


@pytest.mark.parametrize("lhs,rhs,sizes,match", [
    (_s((2, M, K)), _s((G, K, N)), SIZES, "lhs.shape=(2, 64, 32) but expected [m, k]"),
    (_s((M, K)), _s((G + 1, K, N)), SIZES,
     "rhs.shape=(5, 32, 16) but expected [num_groups, k, n] with num_groups=4"),
    (_s((M, K)), _s((G, K + 1, N)), SIZES, "k=32 (lhs.shape[1])"),
    (_s((M, K)), _s((G, K, N)), _s((G,)), "group_sizes.dtype=float32 but expected int32"),
    (_s((M, K)), _s((G, K, N)), _s((1, G), jnp.int32),
     "group_sizes.shape=(1, 4) but expected [num_groups]"),
    (_s((M, K)), _s((G, K, N), jnp.bfloat16), SIZES,
     "lhs.dtype=float32 and rhs.dtype=bfloat16 must match"),
    (_s((M, K), jnp.int32), _s((G, K, N), jnp.int32), SIZES, "lhs.dtype=int32 is not accepted"),
])
def test_grouped_matmul_rejects_bad_arguments(lhs, rhs, sizes, match):
  _raises(match, pallas_kernels.grouped_matmul, lhs, rhs, sizes)
  _raises(match, lambda *a: gmm_lib.gmm(*a, interpret=True), lhs, rhs, sizes)


def test_tgmm_and_backend_and_tiling_checks():
  _raises("grad.shape=(63, 16) but expected [m, n] with m=64", gmm_lib.tgmm,
          _s((M, K)), _s((M - 1, N)), SIZES)
  args = (_s((M, K)), _s((G, K, N)), SIZES)
  _raises("backend='cuda' is not accepted", lambda *a: gmm_lib.gmm(*a, backend="cuda"), *args)
  with pytest.raises(ValueError, match=re.escape("GmmTiling.tm=12 must be an int >= 8")):
    pallas_kernels.GmmTiling(tm=12)
  # Hardware tile limits are checked outside interpret mode, before lowering.
  big = (_s((4096, 512)), _s((G, 512, 256)), SIZES)
  tiling = pallas_kernels.GmmTiling(128, 64, 128)
  _raises("tiling.tk=64 must be a multiple of 128 for the Mosaic (TPU) body",
          lambda *a: gmm_lib.gmm(*a, tiling=tiling, backend="mosaic"), *big)
  _raises("tiling.tm=48 must be a power of two >= 16 for the Triton (GPU) body",
          lambda *a: gmm_lib.gmm(*a, tiling=pallas_kernels.GmmTiling(48, 64, 64), backend="triton"),
          *big)


B, S, H, KV, D = 2, 24, 4, 2, 16
Q, KV_ARG, IDS = _s((B, S, H, D)), _s((B, S, KV, D)), _s((B, S), jnp.int32)


@pytest.mark.parametrize("q,k,v,seg,grp,match", [
    (_s((B, S, H * D)), KV_ARG, KV_ARG, IDS, IDS,
     "q.shape=(2, 24, 64) but expected [batch, seq, num_heads, head_dim]"),
    (Q, _s((B, S + 1, KV, D)), KV_ARG, IDS, IDS,
     "k.shape=(2, 25, 2, 16) but expected [batch, seq, num_kv_heads, head_dim] with "
     "batch_size=2, seq_len=24"),
    (Q, _s((B, S, 3, D)), _s((B, S, 3, D)), IDS, IDS,
     "num_heads=4 (q.shape[2]) must be a multiple of num_kv_heads=3"),
    (Q, KV_ARG, _s((B, S, KV, D), jnp.bfloat16), IDS, IDS, "v.dtype=bfloat16 must match"),
    (Q, KV_ARG, KV_ARG, _s((B, S + 1), jnp.int32), IDS,
     "segment_ids.shape=(2, 25) but expected (2, 24)"),
    (Q, KV_ARG, KV_ARG, IDS, _s((B, S), jnp.float32), "group_ids.dtype=float32 but expected int32"),
])
def test_flash_attention_rejects_bad_arguments(q, k, v, seg, grp, match):
  _raises(match, lambda *a: pallas_kernels.flash_attention(*a, interpret=True), q, k, v, seg, grp)


def test_block_size_checks():
  with pytest.raises(ValueError, match=re.escape("BlockSizes.block_q=12 must be an int >= 8")):
    pallas_kernels.BlockSizes(block_q=12)
  match = "BlockSizes.block_q=24 must divide the largest block (32)"
  with pytest.raises(ValueError, match=re.escape(match)):
    pallas_kernels.BlockSizes(block_q=24, block_k=32)
  args = (_s((1, 1024, 8, 128)), _s((1, 1024, 2, 128)), _s((1, 1024, 2, 128)))
  _raises("block_sizes.block_k=64 must be a multiple of 128",
          lambda *a: attention.flash_attention_fwd(
              *a, block_sizes=pallas_kernels.BlockSizes(128, 64), backend="mosaic"), *args)
  _raises("block_sizes.block_q=8 must be a power of two >= 16 for the Triton (GPU) body",
          lambda *a: attention.flash_attention_fwd(
              *a, block_sizes=pallas_kernels.BlockSizes(8, 64), backend="triton"), *args)
