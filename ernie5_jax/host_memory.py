"""Host allocator settings: keep freed buffers in the heap (Linux, glibc).

XLA's CPU runtime allocates each executable's results and temporaries with malloc; the
temporaries of a train step come as one block (427 MiB for benchmarks/presets.py's "small"
step, 1.7 GiB for "medium"), allocated and freed by one of its worker threads every call.
glibc serves a block above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
mmap'd pages and unmaps it on free, so every step page-faulted its temporaries anew (110k
faults per "small" step): the kernel zero-fills each page before XLA writes it, and on this
project's VM a step after a few idle seconds took 15-30% longer again (docs/results.md).

Two settings keep such blocks in the heap for the next step. The cost: the process keeps
its peak heap, per allocating thread, instead of returning freed memory to the system (the
"medium" step's peak resident memory: 4.8 -> 7.4 GB, as two XLA threads each keep one).

- On import (mallopt, stdlib only): the mmap and trim thresholds raised to 2 GiB - 1, so
  the main thread's heap keeps every block below that.
- At the start of a command-line entry point (ernie5_jax.main, benchmarks/train_step.py,
  the benchmark workers): restart_with_tunable() re-executes the command once with
  tunable()'s entries added to GLIBC_TUNABLES, since glibc reads tunables only when a
  process starts. A thread other than the main one allocates from a secondary arena, whose
  heaps glibc caps at 64 MiB: a larger block was mapped per call whatever the thresholds.
  Where the kernel offers 1 GiB huge pages, the entries are
  `glibc.malloc.hugetlb=1073741824:glibc.malloc.top_pad=4294967296`. With that page size
  glibc caps a thread's heaps at four pages (4 GiB; arena.c heap_max_size, glibc >= 2.35),
  so XLA's worker threads keep their step temporaries too, and it maps heaps with 1 GiB
  pages only where the administrator reserved some (else normal pages, silently). The pad
  of one whole heap stops glibc from unmapping a thread's extra heap once it is empty: with
  two "medium" steps in flight the second step's block opened one, and lost it, every step
  (448k faults per two steps; 0 with the pad). With the pad glibc also makes a new thread
  heap writable whole (4 GiB) and grows the main heap 4 GiB at a time: address space, used
  as memory only where pages are written. Under strict overcommit accounting
  (vm.overcommit_memory=2) those reservations would be charged, so the pad is left out.
  Without 1 GiB pages the entry is `glibc.malloc.hugetlb=1`: transparent huge pages for the
  blocks still mapped per call, which then fault 2 MiB at a time (110k -> ~700 faults per
  "small" step). Figures, both protocols: docs/results.md, fifth round.

A notebook or another program sets GLIBC_TUNABLES in its own environment before Python
starts. ERNIE5_JAX_SYSTEM_MALLOC=1 in the environment leaves glibc's defaults (no mallopt,
no restart), as does an explicit `glibc.malloc.hugetlb=<any>` for the tunable alone. A
no-op where there is no glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# mallopt takes an int: the largest threshold is 2 GiB - 1. Blocks below it come from (and
# go back to) the heap; a larger one (a step whose temporaries exceed 2 GiB) is still mapped
# per call.
MMAP_THRESHOLD = (1 << 31) - 1
TRIM_THRESHOLD = (1 << 31) - 1  # never return the heap top to the system
_HUGETLB = "glibc.malloc.hugetlb"  # the GLIBC_TUNABLES key (glibc >= 2.35)
GIB_PAGES_DIR = "/sys/kernel/mm/hugepages/hugepages-1048576kB"  # where the kernel has them
OVERCOMMIT = "/proc/sys/vm/overcommit_memory"  # "2": strict accounting of reserved memory
_GIB_PAGE = 1 << 30
_HEAP_MAX = 4 * _GIB_PAGE  # a thread heap's cap with that page size: four pages (glibc arena.c)
OPT_OUT = "ERNIE5_JAX_SYSTEM_MALLOC"

_applied: bool | None = None  # whether the thresholds are raised, once applied


def _env_flag(name: str, env=os.environ) -> bool:
  return env.get(name, "") not in ("", "0")


def keep_freed_memory() -> bool:
  """Raises glibc's mmap / trim thresholds once per process; returns whether they are set."""
  global _applied
  if _applied is None:
    _applied = False
    if sys.platform.startswith("linux") and not _env_flag(OPT_OUT):
      try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = all(libc.mallopt(param, value) for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
      except (OSError, AttributeError):  # not glibc
        pass
  return _applied


def glibc_version() -> tuple[int, ...]:
  """(major, minor) of the running glibc; () where there is none (macOS, musl)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
  except (AttributeError, OSError, ValueError):
    return ()
  return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def strict_overcommit() -> bool:
  """Whether the kernel charges reserved address space (vm.overcommit_memory=2)."""
  try:
    with open(OVERCOMMIT) as f:
      return f.read().strip() == "2"
  except OSError:
    return False


def tunable() -> str:
  """The GLIBC_TUNABLES entries for this machine (module docstring): 4 GiB heaps, else THP."""
  if not os.path.isdir(GIB_PAGES_DIR):
    return f"{_HUGETLB}=1"
  # A pad of a whole heap: glibc never deletes a thread's extra heap once it is empty.
  pad = "" if strict_overcommit() else f":glibc.malloc.top_pad={_HEAP_MAX}"
  return f"{_HUGETLB}={_GIB_PAGE}{pad}"


def _tunables(env) -> list[str]:
  """The entries of env's GLIBC_TUNABLES."""
  return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def malloc_tunables() -> str:
  """The GLIBC_TUNABLES this process started with; "" without them (or glibc < 2.35)."""
  return os.environ.get("GLIBC_TUNABLES", "") if glibc_version() >= (2, 35) else ""


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
  """env (default os.environ) with tunable()'s entries added to GLIBC_TUNABLES.

  Unchanged where env opts out (OPT_OUT) or already sets glibc.malloc.hugetlb (any value:
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 runs without it); an entry env sets otherwise (say
  glibc.malloc.top_pad) keeps its value.
  """
  env = dict(os.environ if env is None else env)
  tunables = _tunables(env)
  keys = {t.partition("=")[0] for t in tunables}
  if not _env_flag(OPT_OUT, env) and _HUGETLB not in keys:
    added = [t for t in tunable().split(":") if t.partition("=")[0] not in keys]
    env["GLIBC_TUNABLES"] = ":".join(tunables + added)
  return env


def restart_with_tunable() -> None:
  """Re-executes this command with tunable() in GLIBC_TUNABLES, once; returns where it has it.

  For command-line entry points, before their heavy imports: where environment() would not
  change this process's environment, or there is no glibc >= 2.35, it returns at once.
  """
  env = environment()
  if glibc_version() < (2, 35) or env == dict(os.environ):  # has it, chose otherwise, opted out
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def info() -> dict[str, bool | str]:
  """The settings in effect, as benchmark workers report them."""
  return {"host_malloc": keep_freed_memory(), "malloc_tunables": malloc_tunables()}
