"""host_memory: glibc's mmap / trim thresholds raised on import, and the opt-out."""

import ctypes
import os
import subprocess
import sys

import pytest

from ernie5_jax import host_memory

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mapped_bytes_of_a_malloc(num_bytes: int) -> int:
  """Bytes glibc serves by mmap (mallinfo2.hblkhd) while a block of num_bytes is held."""
  libc = ctypes.CDLL("libc.so.6")
  libc.mallinfo2.restype = _MallInfo2
  libc.malloc.restype = ctypes.c_void_p
  block = libc.malloc(ctypes.c_size_t(num_bytes))
  try:
    return libc.mallinfo2().hblkhd
  finally:
    libc.free(ctypes.c_void_p(block))


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_import_keeps_large_blocks_in_the_heap():
  assert host_memory.keep_freed_memory()
  before = _mapped_bytes_of_a_malloc(1)
  # 256 MiB: far above glibc's default threshold (128 KiB, adapting up to 32 MiB).
  assert _mapped_bytes_of_a_malloc(256 << 20) == before


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_opt_out_leaves_glibc_defaults():
  code = ("import ernie5_jax, sys; from ernie5_jax import host_memory; "
          "sys.exit(0 if host_memory.keep_freed_memory() is False else 1)")
  env = dict(os.environ, **{host_memory.OPT_OUT: "1"})
  assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
