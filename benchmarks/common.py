"""Helpers shared by the benchmark scripts: timing and writing results."""

import json
import pathlib
import time

import jax
import numpy as np


def median_ms(fn, args, iters: int) -> float:
  """Median wall time of fn(*args) in milliseconds over `iters` calls, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write_json(record: dict, name: str, out: str | None = None) -> pathlib.Path:
  """Writes record as JSON to `out` or benchmarks/results/<name>.json; prints and returns it."""
  path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=2))
  print(f"wrote {path}")
  return path
