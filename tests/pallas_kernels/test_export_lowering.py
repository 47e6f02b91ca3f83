"""The kernels lower for TPU (Mosaic) and GPU (Triton) on this CPU-only machine.

`jax.export` runs the Pallas -> Mosaic / Triton lowering at realistic shapes
with jax.ShapeDtypeStruct arguments (nothing is allocated). Triton IR has no
serialization-stability guarantee, so its custom call is allow-listed
explicitly; Mosaic's tpu_custom_call is stable and needs nothing.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels

TRITON_CALL = "__gpu$xla.gpu.triton"
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON_CALL}
DISABLED = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]


def _export(fn, platforms, *args):
  """Exports jit(fn) for `platforms`; returns the StableHLO text."""
  exported = export.export(jax.jit(fn), platforms=platforms, disabled_checks=DISABLED)(*args)
  return exported.mlir_module()


def _gmm_args(dtype):
  m, k, n, g = 4096, 512, 256, 64
  return (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
          jax.ShapeDtypeStruct((g,), jnp.int32))


def _attention_args(dtype, head_dim=128):
  b, s, h, kv = 1, 1024, 8, 2
  return (jax.ShapeDtypeStruct((b, s, h, head_dim), dtype),
          jax.ShapeDtypeStruct((b, s, kv, head_dim), dtype),
          jax.ShapeDtypeStruct((b, s, kv, head_dim), dtype),
          jax.ShapeDtypeStruct((b, s), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32))


# Non-linear losses, so the forward kernel stays live in the gradient.
def _gmm_loss(lhs, rhs, sizes):
  return jnp.square(pallas_kernels.grouped_matmul(lhs, rhs, sizes).astype(jnp.float32)).sum()


def _attention_loss(q, k, v, seg, grp):
  return jnp.square(pallas_kernels.flash_attention(q, k, v, seg, grp).astype(jnp.float32)).sum()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_grouped_matmul_lowers_forward_and_backward(platform, dtype):
  args = _gmm_args(dtype)
  forward = _export(pallas_kernels.grouped_matmul, [platform], *args)
  assert forward.count(KERNEL_CALL[platform]) == 1
  backward = _export(jax.grad(_gmm_loss, argnums=(0, 1)), [platform], *args)
  assert backward.count(KERNEL_CALL[platform]) == 3  # gmm, gmm(rhs transposed), tgmm


@pytest.mark.parametrize("head_dim", [128, 64], ids=["d128", "d64"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_flash_attention_lowers_forward_and_backward(platform, head_dim):
  args = _attention_args(jnp.bfloat16, head_dim)
  forward = _export(pallas_kernels.flash_attention, [platform], *args)
  assert forward.count(KERNEL_CALL[platform]) == 1
  backward = _export(jax.grad(_attention_loss, argnums=(0, 1, 2)), [platform], *args)
  assert backward.count(KERNEL_CALL[platform]) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_backend_picks_the_body_of_the_lowering_platform(platform):
  # backend="auto" (the default used above) defers the choice to lowering via
  # lax.platform_dependent: only the lowering platform's body is emitted.
  # (A single multi-platform artifact is not possible: JAX lowers each
  # pallas_call for every export platform, and a Mosaic call cannot lower
  # for CUDA.)
  other = KERNEL_CALL["cuda" if platform == "tpu" else "tpu"]
  text = _export(_gmm_loss, [platform], *_gmm_args(jnp.bfloat16))
  assert KERNEL_CALL[platform] in text and other not in text
