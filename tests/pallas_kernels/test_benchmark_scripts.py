"""The benchmark scripts run end to end (--smoke: CPU interpret mode, tiny shapes)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["pallas_gmm", "pallas_attention"])
def test_benchmark_smoke_writes_json(name, tmp_path):
  out = tmp_path / f"{name}.json"
  assert _load(name).main(["--smoke", "--out", str(out)]) == 0
  record = json.loads(out.read_text())
  assert record["smoke"] and record["results"]
  kernel_impl = "pallas_gmm" if name == "pallas_gmm" else "pallas"
  assert kernel_impl in {r["impl"] for r in record["results"]}
  assert all(r.get("ms") is not None for r in record["results"])


def test_benchmarks_skip_cleanly_without_a_gpu(capsys):
  # This machine has no GPU: the real benchmark must say so and exit 0.
  import jax
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: the full benchmark would run")
  for name in ("pallas_gmm", "pallas_attention"):
    assert _load(name).main([]) == 0
    assert "no GPU found" in capsys.readouterr().out


def test_a_benchmark_run_as_a_script_prints_no_tpu_probe_errors(tmp_path):
  # With libtpu installed (the test extra) and JAX_PLATFORMS unset, as in a user's shell.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
      [sys.executable, str(BENCHMARKS / "pallas_gmm.py"), "--smoke", "--out",
       str(tmp_path / "gmm.json")], env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "libtpu" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
