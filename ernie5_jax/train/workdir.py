"""One writer per training workdir: an exclusive lock that names its owner.

  with workdir.lock(path):       # WorkdirBusyError if a live run holds it
    trainer.train_and_evaluate(config, path)

`<workdir>/.lock` is held with `fcntl.flock` for the life of the run and records its owner
({"host", "pid", "started"}) for the message another run gets. The kernel drops the lock
when its process dies, so a SIGKILLed or preempted run leaves no lock to clear by hand: the
next run takes it over and logs whose it was. The file is emptied, never deleted, on release
(deleting it would let two later runs lock two different files). Only process 0 of a
multi-host run takes the lock (orbax coordinates the processes' writes). Remote workdirs
(gs://...) are not locked: flock needs a local or NFS path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from ernie5_jax import store

LOCK_FILE = ".lock"


class WorkdirBusyError(store.WorkdirError):
  """Another live run writes the workdir."""


def _read_owner(fd: int) -> dict:
  """The owner record in the lock file; {} when empty (free) or unreadable."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors="replace").strip()
  try:
    owner = json.loads(text) if text else {}
  except ValueError:
    return {"record": text[:80]}
  return owner if isinstance(owner, dict) else {}


def acquire(workdir: str) -> int:
  """Takes <workdir>/.lock for this process; returns its open file descriptor.

  Raises WorkdirBusyError naming the owner (host, pid, start time) if a live run holds it.
  """
  store.ensure_writable(workdir)
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    owner = _read_owner(fd)
    os.close(fd)
    raise WorkdirBusyError(
        f"--workdir={workdir!r} is in use by another run (host {owner.get('host')}, pid "
        f"{owner.get('pid')}, started {owner.get('started')}; lock {path}): wait for it to "
        "finish or pick another --workdir") from None
  previous = _read_owner(fd)
  if previous:
    logging.warning("Took over the lock of %s: that run ended without releasing it "
                    "(killed or preempted).", previous)
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  os.fsync(fd)
  return fd


def release(fd: int) -> None:
  """Empties the lock file (this run is over) and drops the lock."""
  with contextlib.suppress(OSError):  # A full disk must not hide the run's own error.
    os.ftruncate(fd, 0)
  os.close(fd)  # Closing the descriptor releases the flock.


@contextlib.contextmanager
def lock(workdir: str, *, primary: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the block; primary=False (other hosts), or a remote
  workdir, takes none."""
  if not primary or "://" in str(workdir):
    yield
    return
  fd = acquire(workdir)
  try:
    yield
  finally:
    release(fd)
