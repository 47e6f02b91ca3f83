"""Shared timing helper of the benchmark scripts."""

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
