"""Host allocator setting: keep freed buffers in the process heap (Linux, glibc).

XLA's CPU runtime allocates each executable's results and temporaries with malloc, from
its worker threads. glibc serves a block above its mmap threshold (128 KiB, adapting up to
32 MiB) with fresh mmap'd pages and unmaps it on free; a thread other than the main one
allocates from a secondary arena, whose heaps cannot hold a block above 64 MiB at all. So
every train step page-faults its large buffers anew (the "small" preset's 427 MiB of
temporaries are mapped and unmapped once per step): the kernel zero-fills each page before
XLA writes it. Three mallopt settings make freed blocks stay in the heap and be reused by
the next step: one arena for every thread, and the mmap and trim thresholds raised. The
cost: the process keeps its peak heap instead of returning freed memory to the system, and
threads share one malloc lock (XLA allocates a few buffers per step).

Measured on the 2-core CPU: benchmarks/compare_frameworks.py runs every contender, PyTorch
included, with or without this setting (docs/results.md). PyTorch allocates on its main
thread, so the thresholds alone give it the whole gain.

Applied once when ernie5_jax is imported (stdlib only); threads that allocated before that
keep their arenas. ERNIE5_JAX_SYSTEM_MALLOC=1 in the environment leaves glibc's defaults.
A no-op where there is no glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# mallopt takes an int: the largest threshold is 2 GiB - 1. Blocks below it come from (and
# go back to) the heap; a larger one (a step whose temporaries exceed 2 GiB) is still mapped
# per call. benchmarks/presets.py's "medium" step holds 1.95 GiB of temporaries.
MMAP_THRESHOLD = (1 << 31) - 1
TRIM_THRESHOLD = (1 << 31) - 1  # never return the heap top to the system
ARENA_MAX = 1  # every thread allocates from the main heap
OPT_OUT = "ERNIE5_JAX_SYSTEM_MALLOC"

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Applies the heap settings once per process; returns whether they are set."""
  global _applied
  if _applied is None:
    _applied = False
    if sys.platform.startswith("linux") and os.environ.get(OPT_OUT, "") in ("", "0"):
      try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = bool(libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
                        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
      except (OSError, AttributeError):  # not glibc
        _applied = False
  return _applied
