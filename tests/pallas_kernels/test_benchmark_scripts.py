"""The benchmark scripts run end to end (--smoke: CPU interpret mode, tiny shapes)."""

import importlib.util
import json
import pathlib

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
