"""Benchmark: train-step throughput, model-FLOPs utilisation and compile count.

Runs the real jitted train step (ernie5_jax.train.step) of an experiment config on
pre-staged synthetic batches, so the figure is the step alone, not the input
pipeline. Model FLOPs are counted analytically (ernie5_jax/model/flops.py: PaLM
App. B). MFU is against an f32 matmul rate measured in the same run.
The step must compile exactly once over all the steps.

  python benchmarks/train_step.py                          # experiments/tiny.py, 50 steps
  python benchmarks/train_step.py --steps 100 --config experiments/tiny.py

Prints the figures and writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ernie5_jax import config as config_lib  # noqa: E402
from ernie5_jax import input_pipeline  # noqa: E402
from ernie5_jax.model import create_model, flops  # noqa: E402
from ernie5_jax.train import optimizer  # noqa: E402
from ernie5_jax.train import state as state_lib  # noqa: E402
from ernie5_jax.train import step as step_lib  # noqa: E402


def matmul_flops_per_sec(n: int = 1024, iters: int = 10) -> float:
  """Measured rate of one f32 [n, n] x [n, n] matmul (the roofline MFU is taken against)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / float(np.median(times))


def main(argv=None) -> int:
  """Runs the benchmark; returns the process exit code (1 if the step recompiled)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "experiments" / "tiny.py"))
  parser.add_argument("--steps", type=int, default=50, help="Timed steps (compile included).")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
  args = parser.parse_args(argv)

  config = runpy.run_path(args.config)["get_config"]()
  config_lib.validate(config)
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, state = state_lib.init_train_state(lambda: create_model(config), tx)
  train_step = step_lib.make_train_step(config, graphdef, tx, schedule)
  data = input_pipeline.create_train_iterator(config)
  batches = [jax.device_put(next(data)) for _ in range(args.steps)]  # staged: time the step only

  compiles = []  # backend compiles of any function while stepping
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  start = time.perf_counter()
  state, metrics = train_step(state, batches[0])
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  steady_s = time.perf_counter() - start
  backend_compiles = len(compiles)
  step_compiles = train_step._cache_size()  # pylint: disable=protected-access

  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  steady_steps = args.steps - 1
  tokens_per_sec = steady_steps * tokens_per_step / steady_s
  flops_per_token = flops.train_flops_per_token(config)
  matmul_rate = matmul_flops_per_sec()
  mfu = tokens_per_sec * flops_per_token / matmul_rate
  params = flops.active_matmul_params(config.model)
  result = {
      "benchmark": "train_step",
      "config": pathlib.Path(args.config).name,
      "device": str(jax.devices()[0]), "platform": jax.default_backend(),
      "jax_version": jax.__version__,
      "global_batch_size": config.data.global_batch_size, "seq_len": config.data.seq_len,
      "steps": args.steps,
      "first_step_s (compile + run)": first_s,
      "step_ms": 1e3 * steady_s / steady_steps,
      "tokens_per_sec": tokens_per_sec,
      "total_params": state_lib.num_params(state.params),
      "active_matmul_params": params,
      "model_flops_per_token": flops_per_token,
      "model_flops_per_sec": tokens_per_sec * flops_per_token,
      "f32_matmul_flops_per_sec": matmul_rate,
      "mfu": mfu,
      "train_step_compiles": step_compiles,
      "backend_compiles_while_stepping": backend_compiles,
      "final_loss": float(metrics["loss"]),
  }
  print(f"train step, {result['config']} on {result['device']}: "
        f"{result['step_ms']:.2f} ms/step, {tokens_per_sec:,.0f} tokens/s")
  print(f"  model FLOPs {flops_per_token / 1e6:.2f} MFLOP/token -> "
        f"{result['model_flops_per_sec'] / 1e9:.2f} GFLOP/s; f32 matmul "
        f"{matmul_rate / 1e9:.1f} GFLOP/s; MFU {100 * mfu:.1f}%")
  print(f"  first step {first_s:.1f} s (compile); train step compiled {step_compiles}x over "
        f"{args.steps} steps; total params {result['total_params']:,}, active matmul params "
        f"{sum(params.values()):,}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"  wrote {out}")
  if step_compiles != 1:
    print(f"ERROR: the train step compiled {step_compiles} times (expected 1)")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
