"""host_memory: glibc's thresholds raised on import, the tunable a command restarts with, opt-out.

Each check runs in a fresh interpreter: the heap is process-global state, and a malloc that
once failed in a test process (a deliberate out-of-memory case, say) moves glibc's main
thread to a secondary arena for good, where large blocks are always mapped.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ernie5_jax import host_memory

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
# glibc sizes thread heaps by a 1 GiB page size (host_memory.tunable()) only with both.
GIB_HEAPS = host_memory.glibc_version() >= (2, 35) and os.path.isdir(host_memory.GIB_PAGES_DIR)
BLOCK = 256 << 20  # above glibc's default threshold (128 KiB, adapting up to 32 MiB) and
# above what a secondary arena's heap can hold (64 MiB)

# glibc's malloc / free / mallinfo2 through ctypes, for the probes below.
_LIBC = textwrap.dedent("""
    import ctypes, json, threading

    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
""")

# Prints, as JSON, whether the setting is applied and the bytes glibc serves by mmap while
# a 1-byte and a BLOCK-byte block are held, from the main thread and from a new thread (as
# XLA's CPU runtime allocates from its worker threads).
_PROBE = _LIBC + textwrap.dedent(f"""
    import ernie5_jax
    from ernie5_jax import host_memory

    def mapped(num_bytes):
      block = libc.malloc(ctypes.c_size_t(num_bytes))
      try:
        return libc.mallinfo2().hblkhd
      finally:
        libc.free(ctypes.c_void_p(block))

    out = dict(applied=host_memory.keep_freed_memory(), main=[mapped(1), mapped({BLOCK})])
    worker = threading.Thread(target=lambda: out.update(thread=[mapped(1), mapped({BLOCK})]))
    worker.start()
    worker.join()
    print(json.dumps(out))
""")


def _probe(script: str = _PROBE, **env) -> dict:
  """Runs script (default _PROBE) in a fresh interpreter with env added; returns its JSON."""
  # glibc's own arena settings from the caller's environment would change what is probed.
  ignored = (host_memory.OPT_OUT, "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
  env = {k: v for k, v in os.environ.items() if k not in ignored} | env
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, check=True).stdout
  return json.loads(out)


def _kept(pair: list[int]) -> bool:
  small, large = pair
  return large == small


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_import_keeps_large_blocks_of_the_main_thread_in_the_heap():
  out = _probe()
  assert out["applied"]
  assert _kept(out["main"])
  assert not _kept(out["thread"])  # a secondary arena's 64 MiB heaps map it: the tunable's job


@pytest.mark.skipif(not GIB_HEAPS, reason="glibc >= 2.35 on a kernel with 1 GiB pages only")
def test_gib_tunable_keeps_large_blocks_of_every_thread_in_the_heap():
  out = _probe(GLIBC_TUNABLES=host_memory.tunable())
  assert out["applied"]
  assert _kept(out["main"]) and _kept(out["thread"])


# Prints whether a thread's second heap survives being emptied: the thread holds most of its
# first heap (two 1.5 GiB blocks of 4 GiB), so a third opens another; mallinfo2().arena is
# the bytes every arena holds from the system. Nothing is written: the blocks stay virtual.
_SECOND_HEAP = _LIBC + textwrap.dedent("""
    import ernie5_jax  # the raised thresholds: blocks below 2 GiB come from the heaps
    out = {}

    def run():
      held = [libc.malloc(ctypes.c_size_t(3 << 29)) for _ in range(2)]
      block = libc.malloc(ctypes.c_size_t(3 << 29))
      before = libc.mallinfo2()
      libc.free(ctypes.c_void_p(block))
      after = libc.mallinfo2()
      out.update(in_heaps=before.hblkhd == 0, kept=after.arena == before.arena)
      for pointer in held:
        libc.free(ctypes.c_void_p(pointer))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    print(json.dumps(out))
""")


@pytest.mark.skipif(not GIB_HEAPS or host_memory.strict_overcommit(),
                    reason="glibc >= 2.35, 1 GiB pages and heuristic overcommit only")
def test_tunable_keeps_a_threads_second_heap_once_empty():
  out = _probe(_SECOND_HEAP, GLIBC_TUNABLES=host_memory.tunable())
  assert out == {"in_heaps": True, "kept": True}
  hugetlb_only = host_memory.tunable().split(":")[0]  # without the pad: glibc unmaps it
  assert _probe(_SECOND_HEAP, GLIBC_TUNABLES=hugetlb_only) == {"in_heaps": True, "kept": False}


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_opt_out_leaves_glibc_defaults():
  out = _probe(**{host_memory.OPT_OUT: "1"})
  assert not out["applied"]
  small, large = out["main"]
  assert large >= small + BLOCK


def test_tunable_is_1_gib_pages_and_a_heap_of_pad_where_the_kernel_has_them(
    monkeypatch, tmp_path):
  monkeypatch.setattr(host_memory, "GIB_PAGES_DIR", str(tmp_path))
  overcommit = tmp_path / "overcommit_memory"
  monkeypatch.setattr(host_memory, "OVERCOMMIT", str(overcommit))
  overcommit.write_text("0\n")
  assert host_memory.tunable() == ("glibc.malloc.hugetlb=1073741824:"
                                   "glibc.malloc.top_pad=4294967296")
  overcommit.write_text("2\n")  # strict accounting would charge every pad: none
  assert host_memory.tunable() == "glibc.malloc.hugetlb=1073741824"
  monkeypatch.setattr(host_memory, "GIB_PAGES_DIR", str(tmp_path / "absent"))
  assert host_memory.tunable() == "glibc.malloc.hugetlb=1"


def test_environment_adds_the_tunable_once_and_keeps_the_others():
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.check=0", "X": "1"})
  assert env == {"GLIBC_TUNABLES": f"glibc.malloc.check=0:{host_memory.tunable()}", "X": "1"}
  assert host_memory.environment(env) == env
  assert "GLIBC_TUNABLES" not in host_memory.environment({host_memory.OPT_OUT: "1"})
  chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's choice stays
  assert host_memory.environment(chosen) == chosen


def test_environment_keeps_an_entry_the_user_set(monkeypatch, tmp_path):
  monkeypatch.setattr(host_memory, "GIB_PAGES_DIR", str(tmp_path))  # the tunable has a pad
  monkeypatch.setattr(host_memory, "OVERCOMMIT", str(tmp_path / "absent"))
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.top_pad=0:glibc.malloc.hugetlb=1073741824"


# Prints "start" each time it runs, then whether the process has the tunable, as JSON.
_RESTART = textwrap.dedent("""
    import json, os
    print("start", flush=True)
    from ernie5_jax import host_memory
    host_memory.restart_with_tunable()
    print(json.dumps(dict(info=host_memory.info(), tunables=os.environ.get("GLIBC_TUNABLES"))))
""")


def _restart(**env) -> tuple[int, dict]:
  """Runs _RESTART fresh with env added; returns (times it started, its JSON line)."""
  ignored = (host_memory.OPT_OUT, "GLIBC_TUNABLES")
  env = {k: v for k, v in os.environ.items() if k not in ignored} | env
  lines = subprocess.run([sys.executable, "-c", _RESTART], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
  return lines.count("start"), json.loads(lines[-1])


@pytest.mark.skipif(host_memory.glibc_version() < (2, 35), reason="glibc >= 2.35 only")
def test_restart_adds_the_tunable_once_and_honours_the_opt_out():
  starts, out = _restart(GLIBC_TUNABLES="glibc.malloc.check=0")
  assert starts == 2
  assert out["info"]["malloc_tunables"] == out["tunables"]
  assert out["tunables"] == f"glibc.malloc.check=0:{host_memory.tunable()}"
  starts, out = _restart(**{host_memory.OPT_OUT: "1"})
  assert starts == 1 and not out["info"]["malloc_tunables"] and out["tunables"] is None
