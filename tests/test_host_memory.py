"""host_memory: one arena, glibc's mmap / trim thresholds raised on import, and the opt-out.

Each check runs in a fresh interpreter: the heap is process-global state, and a malloc that
once failed in a test process (a deliberate out-of-memory case, say) moves glibc's main
thread to a secondary arena for good, where large blocks are always mapped.
"""

import os
import subprocess
import sys
import textwrap

import pytest

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# Prints "<setting applied> <bytes mapped for a 1-byte block> <bytes mapped for 256 MiB>",
# both allocated from a new thread (as XLA's CPU runtime allocates from its worker threads).
_PROBE = textwrap.dedent("""
    import ctypes
    import threading
    import ernie5_jax
    from ernie5_jax import host_memory

    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p

    def mapped_bytes_while_holding(num_bytes):
      block = libc.malloc(ctypes.c_size_t(num_bytes))
      try:
        return libc.mallinfo2().hblkhd  # bytes glibc serves by mmap
      finally:
        libc.free(ctypes.c_void_p(block))

    figures = []
    worker = threading.Thread(target=lambda: figures.extend(
        [mapped_bytes_while_holding(1), mapped_bytes_while_holding(256 << 20)]))
    worker.start()
    worker.join()
    print(host_memory.keep_freed_memory(), *figures)
""")


def _probe(**env) -> tuple[bool, int, int]:
  """Runs _PROBE in a fresh interpreter with env added; returns its three figures."""
  out = subprocess.run([sys.executable, "-c", _PROBE], env=dict(os.environ, **env),
                       capture_output=True, text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_import_keeps_large_blocks_in_the_heap():
  applied, small, large = _probe()
  assert applied
  # 256 MiB: far above glibc's default threshold (128 KiB, adapting up to 32 MiB) and above
  # what a secondary arena's heap can hold (64 MiB).
  assert large == small


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_opt_out_leaves_glibc_defaults():
  from ernie5_jax import host_memory
  applied, small, large = _probe(**{host_memory.OPT_OUT: "1"})
  assert not applied
  assert large >= small + (256 << 20)
