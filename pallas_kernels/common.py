"""Helpers shared by the Pallas kernels: backend choice, padding, argument checks.

Every kernel in this package has two bodies: one for Mosaic (TPU) and one for
Triton (GPU). `dispatch` picks between them. With `backend="auto"` the choice is
made by `jax.lax.platform_dependent`, i.e. at lowering time, so that
`jax.export.export(..., platforms=["tpu"])` on a CPU-only machine still gets the
TPU body. Both bodies are traced in that case, so a tiling passed explicitly
with `backend="auto"` must suit both (the defaults do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "mosaic", "triton")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Large finite negative logit for masked entries: exp(mask - m) underflows to 0
# without the inf - inf = NaN of a true -inf (same trick as jax's bundled kernels).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def cdiv(a: int, b: int) -> int:
  """Ceiling division of Python ints."""
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  """Smallest multiple of `b` that is >= `a`."""
  return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
  """Smallest power of two >= x (x >= 1)."""
  return 1 << max(x - 1, 0).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, *, mode: str = "constant") -> jax.Array:
  """Pads `x` along `axis` up to `size` (no-op when already that long)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


def out_struct(shape: tuple[int, ...], dtype: Any, *operands: jax.Array) -> jax.ShapeDtypeStruct:
  """A pallas_call out_shape that varies over the mesh axes any of `operands` varies over.

  Inside `jax.shard_map` (check_vma=True) a kernel's output must say over which manual
  mesh axes it varies; a kernel output depends on all its operands, so it is the union of
  theirs. Outside shard_map every operand's set is empty.
  """
  varying = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def check_backend(backend: str) -> None:
  """Raises ValueError unless `backend` is one of BACKENDS."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not accepted; expected one of {BACKENDS}.")


def check_float_dtype(name: str, x: Any) -> None:
  """Raises ValueError unless `x` has a floating dtype the kernels accept."""
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    accepted = tuple(str(d) for d in FLOAT_DTYPES)
    raise ValueError(f"{name}.dtype={x.dtype} is not accepted; expected one of {accepted}.")


def check_int32(name: str, x: Any, shape: tuple[int, ...]) -> None:
  """Raises ValueError unless `x` is an int32 array of exactly `shape`."""
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name}.shape={tuple(x.shape)} but expected {tuple(shape)}.")
  if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
    raise ValueError(f"{name}.dtype={x.dtype} but expected int32.")


def dispatch(
    backend: str,
    interpret: bool,
    mosaic_fn: Callable[..., Any],
    triton_fn: Callable[..., Any],
    *args: Any,
) -> Any:
  """Calls the Mosaic or Triton body of a kernel on `args`.

  "mosaic" / "triton" force that body (on any platform when `interpret`).
  "auto" with `interpret=True` runs the Mosaic body through the interpreter
  (one body: half the CPU compile time). "auto" otherwise defers to the
  lowering platform: TPU -> Mosaic, CUDA/ROCm -> Triton; on CPU the Mosaic
  body is lowered, which Pallas rejects with "Only interpret mode is supported
  on CPU backend": pass interpret=True there (or use a reference).
  """
  check_backend(backend)
  if backend == "mosaic" or (backend == "auto" and interpret):
    return mosaic_fn(*args)
  if backend == "triton":
    return triton_fn(*args)
  return jax.lax.platform_dependent(
      *args, tpu=mosaic_fn, cuda=triton_fn, rocm=triton_fn, default=mosaic_fn)


def searchsorted_right(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
  """Number of entries of 1-D `sorted_values` <= each query, as int32.

  Loop-free ([Q, N] compares): for the small metadata arrays of the kernels,
  where jnp.searchsorted's default while-loop is slower on accelerators.
  """
  return jnp.sum(sorted_values[None, :] <= queries[:, None], axis=1).astype(jnp.int32)
