"""Host allocator setting: keep freed buffers in the process heap (Linux, glibc).

XLA's CPU runtime allocates each executable's results and temporaries with malloc. glibc
serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmap'd
pages and unmaps them on free, so every train step page-faults its large buffers anew:
the kernel zero-fills each 4 KiB page before XLA writes it. Raising the mmap and trim
thresholds makes freed blocks stay in the heap and be reused by the next step. Measured on
the 2-core CPU (benchmarks/compare_frameworks.py, same run, alternating rounds): the
"medium" preset's train step 6% faster, the expert layer alone 20% faster; PyTorch gains
as much from the same setting, so the comparison applies it to both. The cost: the
process keeps its peak heap instead of returning freed memory to the system.

Applied once when ernie5_jax is imported (stdlib only); ERNIE5_JAX_SYSTEM_MALLOC=1 in the
environment leaves glibc's defaults. A no-op where there is no glibc (macOS, musl). Once a
malloc fails in a thread (an out-of-memory error caught and survived), glibc moves that
thread to a secondary arena whose heaps cannot hold blocks above 64 MiB: from then on those
are mapped per call again.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters
# mallopt takes an int: the largest threshold is 2 GiB - 1. Blocks below it come from (and
# go back to) the heap; a larger one (a step whose temporaries exceed 2 GiB) is still mapped
# per call. benchmarks/presets.py's "medium" step holds 1.95 GiB of temporaries.
MMAP_THRESHOLD = (1 << 31) - 1
TRIM_THRESHOLD = (1 << 31) - 1  # never return the heap top to the system
OPT_OUT = "ERNIE5_JAX_SYSTEM_MALLOC"

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Raises glibc's mmap and trim thresholds once per process; returns whether they are set."""
  global _applied
  if _applied is None:
    _applied = False
    if sys.platform.startswith("linux") and os.environ.get(OPT_OUT, "") in ("", "0"):
      try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
      except (OSError, AttributeError):  # not glibc
        _applied = False
  return _applied
