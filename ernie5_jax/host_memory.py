"""Host allocator settings: keep freed buffers in the heap, huge pages (Linux, glibc).

XLA's CPU runtime allocates each executable's results and temporaries with malloc, from
its worker threads. glibc serves a block above its mmap threshold (128 KiB, adapting up to
32 MiB) with fresh mmap'd pages and unmaps it on free, so every train step page-faults its
large buffers anew: the kernel zero-fills each page before XLA writes it. Raising the mmap
and trim thresholds keeps freed blocks in the heap for the next step. The cost: the
process keeps its peak heap instead of returning freed memory to the system.

A thread other than the main one allocates from a secondary arena, whose heaps cannot hold
a block above 64 MiB: those blocks are still mapped per call (the "small" preset's 427 MiB
of step temporaries, once per step). ERNIE5_JAX_ONE_ARENA=1 also makes every thread
allocate from the main heap (M_ARENA_MAX=1), which keeps them too: the small step ran
4-7% faster, but XLA's compiles ran ~30% slower (9.6 -> 12.6 s for the small step, three
alternations), as its compile threads then share one malloc lock. So it is opt-in, for
long CPU runs. PyTorch allocates on its main thread, so the thresholds alone give it the
whole gain (docs/results.md).

Huge pages: glibc's `glibc.malloc.hugetlb=1` tunable asks the kernel for transparent huge
pages for the blocks malloc maps and the heaps it grows, so the blocks a secondary arena
still maps per call fault in 2 MiB at a time instead of 4 KiB: 110k -> ~700 page faults
per "small" step and 448k -> ~1.5k per "medium" step; small 683-696 -> 590-607 ms,
medium 4,212-4,301 -> 3,404-3,530 ms per step (one process each, two timings of four
steps; compiles unchanged). glibc reads tunables only when a process starts, so the
command-line entry points (ernie5_jax.main, benchmarks/train_step.py, the benchmark
workers) call restart_with_huge_pages() first: it re-executes the same command once with
the tunable added to GLIBC_TUNABLES. The blocks are still unmapped after each call, and on
this project's VM a step after a few idle seconds took 15-30% longer; with one arena as well
it did not (docs/results.md, fourth round). Needs glibc >= 2.35 and transparent huge pages
"madvise" or "always" (/sys/kernel/mm/transparent_hugepage/enabled). A notebook or
another program sets it in its own environment before Python starts.

The mallopt settings are applied once when ernie5_jax is imported (stdlib only); threads
that allocated before that keep their arenas. ERNIE5_JAX_SYSTEM_MALLOC=1 in the environment
leaves glibc's defaults (no mallopt, no restart). A no-op where there is no glibc (macOS,
musl).
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
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # a GLIBC_TUNABLES entry (glibc >= 2.35)
_HUGE_PAGES_KEY = HUGE_PAGES.split("=")[0] + "="
OPT_OUT = "ERNIE5_JAX_SYSTEM_MALLOC"
ONE_ARENA = "ERNIE5_JAX_ONE_ARENA"

_state: tuple[bool, bool] | None = None  # (thresholds raised, one arena), once applied


def _env_flag(name: str, env=os.environ) -> bool:
  return env.get(name, "") not in ("", "0")


def _apply() -> tuple[bool, bool]:
  """Makes the mallopt calls the environment asks for; returns what took effect."""
  if not sys.platform.startswith("linux") or _env_flag(OPT_OUT):
    return False, False
  one = _env_flag(ONE_ARENA)
  settings = [(_M_ARENA_MAX, 1)] if one else []
  settings += [(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
  try:
    libc = ctypes.CDLL("libc.so.6")
    applied = all(libc.mallopt(param, value) for param, value in settings)
  except (OSError, AttributeError):  # not glibc
    return False, False
  return applied, applied and one


def keep_freed_memory() -> bool:
  """Applies the heap settings once per process; returns whether they are set."""
  global _state
  if _state is None:
    _state = _apply()
  return _state[0]


def one_arena() -> bool:
  """Whether every thread allocates from the main heap (ERNIE5_JAX_ONE_ARENA=1, applied)."""
  keep_freed_memory()
  return _state[1]


def glibc_version() -> tuple[int, ...]:
  """(major, minor) of the running glibc; () where there is none (macOS, musl)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
  except (AttributeError, OSError, ValueError):
    return ()
  return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def _tunables(env) -> list[str]:
  """The entries of env's GLIBC_TUNABLES."""
  return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages() -> bool:
  """Whether this process started with the huge-page tunable (module docstring)."""
  return HUGE_PAGES in _tunables(os.environ) and glibc_version() >= (2, 35)


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
  """env (default os.environ) with HUGE_PAGES added to GLIBC_TUNABLES.

  Unchanged where env opts out (OPT_OUT) or already sets glibc.malloc.hugetlb (any value:
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 runs without huge pages).
  """
  env = dict(os.environ if env is None else env)
  tunables = _tunables(env)
  chosen = any(t.startswith(_HUGE_PAGES_KEY) for t in tunables)  # e.g. hugetlb=0: kept
  if not _env_flag(OPT_OUT, env) and not chosen:
    env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGE_PAGES])
  return env


def restart_with_huge_pages() -> None:
  """Re-executes this command with the huge-page tunable, once; returns where it has it.

  For command-line entry points, before their heavy imports: where environment() would not
  change this process's environment, or there is no glibc >= 2.35, it returns at once.
  """
  env = environment()
  if glibc_version() < (2, 35) or env == dict(os.environ):  # has it, chose otherwise, opted out
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def info() -> dict[str, bool]:
  """The settings in effect, as benchmark workers report them."""
  return {"host_malloc": keep_freed_memory(), "one_arena": one_arena(),
          "huge_pages": huge_pages()}
