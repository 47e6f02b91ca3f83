"""Runs tests/multidevice/cases.py on 8 simulated CPU devices, in one subprocess.

The device count is fixed when jax starts, and the rest of the suite runs on one device
in-process, so the 8-device cases get their own interpreter (one, to compile little).
"""

import os
import pathlib
import subprocess
import sys

import pytest

CASES = pathlib.Path(__file__).with_name("cases.py")
ROOT = CASES.parents[2]


@pytest.mark.slow
def test_multidevice_cases():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider",
       "-p", "no:xdist", "-p", "no:randomly"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, (
      f"8-device cases failed (rc {result.returncode}):\n{result.stdout[-20000:]}\n"
      f"{result.stderr[-5000:]}")
