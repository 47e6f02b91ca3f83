"""The workdir lock (train/workdir.py): one live run per workdir; a killed run's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from absl import logging

from ernie5_jax.train import workdir

HOLD = """
import sys, time
from ernie5_jax.train import workdir
workdir.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_owner_and_a_killed_owner_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir.WorkdirBusyError, match=(
        rf"--workdir='{tmp_path}' is in use by another run \(host {socket.gethostname()}, pid "
        rf"{holder.pid}, started .*; lock {tmp_path}/.lock\): wait for it to finish or pick "
        "another --workdir")):
      workdir.acquire(str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  warnings = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    with workdir.lock(str(tmp_path)):
      with pytest.raises(workdir.WorkdirBusyError):  # Held: even this process cannot take it twice.
        workdir.acquire(str(tmp_path))
    with workdir.lock(str(tmp_path)):  # Released cleanly: no takeover to report.
      pass
  warnings = [w for w in warnings if w.startswith("Took over")]  # Not other tests' thread hooks.
  assert len(warnings) == 1 and warnings[0].startswith("Took over the lock of {'host': ")
  assert f"'pid': {holder.pid}" in warnings[0]
  assert (tmp_path / ".lock").read_text() == ""  # Emptied, not deleted, on release.


def test_other_hosts_and_remote_workdirs_take_no_lock(tmp_path):
  with workdir.lock(str(tmp_path), primary=False):
    assert not (tmp_path / ".lock").exists()
  with workdir.lock("gs://bucket/run"):
    pass
