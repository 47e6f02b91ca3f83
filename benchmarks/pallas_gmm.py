"""Benchmark: Pallas grouped matmul vs jax.lax.ragged_dot vs one dense matmul (TFLOP/s).

MoE dispatch shapes: m token-slots sorted by expert, G experts with ragged
(multinomial) group sizes, some empty. Times the forward pass and
forward + backward (gradients wrt lhs and rhs); the dense baseline is one
[m, k] x [k, n] matmul of the same FLOPs, i.e. the roofline to aim for.

  python benchmarks/pallas_gmm.py                 # on a GPU (skips without one)
  python benchmarks/pallas_gmm.py --m 16384 --groups 128
  python benchmarks/pallas_gmm.py --smoke         # CPU, interpret mode, tiny shape

Prints a table and writes benchmarks/results/pallas_gmm[_smoke].json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import pallas_kernels  # noqa: E402
from benchmarks.common import median_ms, write_json  # noqa: E402
from ernie5_jax import distributed  # noqa: E402


def _group_sizes(m: int, groups: int, seed: int) -> np.ndarray:
  """Ragged MoE-like group sizes summing to m, with about 1/8 of the groups empty."""
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.full(groups, 2.0))
  weights[rng.random(groups) < 0.125] = 0.0
  weights = weights / weights.sum()
  return rng.multinomial(m, weights).astype(np.int32)


def main(argv=None) -> int:
  """Runs the benchmark; returns the process exit code."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU interpret mode at a tiny shape.")
  parser.add_argument("--m", type=int, default=4096, help="Rows (token-slots).")
  parser.add_argument("--k", type=int, default=512, help="Contraction (d_model).")
  parser.add_argument("--n", type=int, default=256, help="Columns (expert hidden).")
  parser.add_argument("--groups", type=int, default=64, help="Experts.")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/).")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  if args.smoke:
    args.m, args.k, args.n, args.groups, args.iters = 64, 32, 32, 4, 1
    interpret, backend = True, "auto"
  elif platform != "gpu":
    print(f"pallas_gmm: no GPU found (jax.default_backend() = {platform!r}); skipping. "
          "Run on a GPU, or pass --smoke to check the script on CPU in interpret mode.")
    return 0
  else:
    interpret, backend = False, "triton"

  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  sizes_np = _group_sizes(args.m, args.groups, seed=1)
  lhs = jnp.asarray(rng.normal(size=(args.m, args.k)), dtype)  # [m, k]
  rhs = rng.normal(size=(args.groups, args.k, args.n)) / np.sqrt(args.k)
  rhs = jnp.asarray(rhs, dtype)  # [G, k, n]
  sizes = jnp.asarray(sizes_np)  # [G]

  impls = {
      "pallas_gmm": lambda x, w, s: pallas_kernels.grouped_matmul(
          x, w, s, backend=backend, interpret=interpret),
      "ragged_dot": lambda x, w, s: jax.lax.ragged_dot(x, w, s),
      "dense_matmul": lambda x, w, s: x @ w[0],  # same FLOPs, one weight matrix
  }
  flops_fwd = 2.0 * args.m * args.k * args.n
  results = []
  for name, fn in impls.items():
    loss = lambda x, w, s, fn=fn: jnp.sum(fn(x, w, s).astype(jnp.float32))
    passes = {
        "forward": (jax.jit(fn), flops_fwd),
        "forward_backward": (jax.jit(jax.grad(loss, argnums=(0, 1))), 3 * flops_fwd),
    }
    for pass_name, (compiled, flops) in passes.items():
      ms = median_ms(compiled, (lhs, rhs, sizes), args.iters)
      results.append({"impl": name, "pass": pass_name, "ms": ms,
                      "tflops": flops / (ms * 1e-3) / 1e12})

  if args.smoke:  # the numbers mean nothing in interpret mode; check the values instead
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    got = impls["pallas_gmm"](lhs, rhs, sizes).astype(jnp.float32)
    max_err = float(jnp.max(jnp.abs(got - ref)))
    print(f"smoke: max |pallas - ragged_dot| = {max_err:.3g}")
    if not max_err < 0.1:
      return 1

  device = jax.devices()[0].device_kind
  print(f"grouped matmul m={args.m} k={args.k} n={args.n} G={args.groups} {args.dtype} on {device}"
        f" ({int((sizes_np == 0).sum())} empty groups)")
  print(f"{'impl':<14}{'pass':<18}{'ms':>10}{'TFLOP/s':>10}")
  for r in results:
    print(f"{r['impl']:<14}{r['pass']:<18}{r['ms']:>10.3f}{r['tflops']:>10.2f}")

  record = {"benchmark": "pallas_gmm", "device": device, "platform": platform,
            "jax_version": jax.__version__, "smoke": args.smoke,
            "shape": {"m": args.m, "k": args.k, "n": args.n, "groups": args.groups,
                      "dtype": args.dtype, "group_sizes": sizes_np.tolist()},
            "flops_note": "forward 2*m*k*n, forward+backward 3x that",
            "results": results}
  write_json(record, f"pallas_gmm{'_smoke' if args.smoke else ''}", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
