"""Benchmark: Pallas flash attention vs jax.nn.dot_product_attention (xla, cudnn), TFLOP/s.

Two masks: plain causal, and "groups" (the unified-sequence layout: text spans
that are causal and vision-scale spans that are bidirectional inside
themselves). The baselines get the same mask: is_causal=True for causal, a
dense [B, 1, S, S] mask (xla) or additive bias (cudnn) for groups. TFLOP/s
count only the allowed (query, key) pairs: 4 * D FLOPs each forward, 2.5x
that forward + backward (FlashAttention-2 convention).

  python benchmarks/pallas_attention.py            # on a GPU (skips without one)
  python benchmarks/pallas_attention.py --seq 8192 --heads 32 --kv-heads 8
  python benchmarks/pallas_attention.py --smoke    # CPU, interpret mode, tiny shape

Prints a table and writes benchmarks/results/pallas_attention[_smoke].json.
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
from pallas_kernels import attention_mask  # noqa: E402


def _group_layout(batch: int, seq: int, span: int) -> np.ndarray:
  """[B, S] group ids: alternating causal text spans (0) and bidirectional groups."""
  pos = np.arange(seq)
  block = pos // span
  grp = np.where(block % 2 == 1, block // 2 + 1, 0).astype(np.int32)
  return np.broadcast_to(grp, (batch, seq)).copy()


def main(argv=None) -> int:
  """Runs the benchmark; returns the process exit code."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU interpret mode at a tiny shape.")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--group-span", type=int, default=256, help="Tokens per text span / group.")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/).")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  if args.smoke:
    args.batch, args.seq, args.heads, args.kv_heads, args.head_dim = 1, 40, 2, 1, 16
    args.group_span, args.iters = 8, 1
    interpret, backend = True, "auto"
    blocks = pallas_kernels.BlockSizes(block_q=8, block_k=8)
  elif platform != "gpu":
    print(f"pallas_attention: no GPU found (jax.default_backend() = {platform!r}); skipping. "
          "Run on a GPU, or pass --smoke to check the script on CPU in interpret mode.")
    return 0
  else:
    interpret, backend, blocks = False, "triton", None

  b, s, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, s, h, d)), dtype)  # [B, S, H, D]
  k = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)  # [B, S, KV, D]
  v = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  seg = jnp.zeros((b, s), jnp.int32)
  masks = {"causal": jnp.zeros((b, s), jnp.int32),
           "groups": jnp.asarray(_group_layout(b, s, args.group_span))}

  def pallas(q, k, v, grp):
    return pallas_kernels.flash_attention(q, k, v, seg, grp, block_sizes=blocks, backend=backend,
                                          interpret=interpret)

  def compiled_passes(fn):
    """(forward, forward+backward) jitted fns of fn(q, k, v, grp); grp is data, not a constant."""
    loss = lambda q, k, v, grp: jnp.sum(fn(q, k, v, grp).astype(jnp.float32))
    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  pallas_passes = compiled_passes(pallas)  # compiled once, reused for every mask
  results = []
  for mask_name, grp in masks.items():
    dense = attention_mask.dense_mask(seg, grp)[:, None]  # [B, 1, S, S], baselines only
    allowed_pairs = float(jnp.sum(dense)) * h
    causal = mask_name == "causal"
    bias = jnp.where(dense, 0.0, -1e9).astype(dtype)
    impls = {
        "pallas": pallas_passes,
        "xla": compiled_passes(lambda q, k, v, grp, dense=dense, causal=causal:
                               jax.nn.dot_product_attention(
                                   q, k, v, mask=None if causal else dense, is_causal=causal,
                                   implementation="xla")),
    }
    if platform == "gpu":
      impls["cudnn"] = compiled_passes(lambda q, k, v, grp, bias=bias, causal=causal:
                                       jax.nn.dot_product_attention(
                                           q, k, v, bias=None if causal else bias,
                                           is_causal=causal, implementation="cudnn"))
    for name, (forward, forward_backward) in impls.items():
      passes = {"forward": (forward, 4.0 * d * allowed_pairs),
                "forward_backward": (forward_backward, 10.0 * d * allowed_pairs)}
      for pass_name, (compiled, flops) in passes.items():
        row = {"mask": mask_name, "impl": name, "pass": pass_name}
        try:
          ms = median_ms(compiled, (q, k, v, grp), args.iters)
          row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as e:  # e.g. a cuDNN build without this mask / head layout
          row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:200]}")
        results.append(row)
    if args.smoke:  # the numbers mean nothing in interpret mode; check the values instead
      got = pallas_passes[0](q, k, v, grp).astype(jnp.float32)
      ref = pallas_kernels.attention_reference(q, k, v, seg, grp).astype(jnp.float32)
      max_err = float(jnp.max(jnp.abs(got - ref)))
      print(f"smoke {mask_name}: max |pallas - reference| = {max_err:.3g}")
      if not max_err < 0.1:
        return 1

  device = jax.devices()[0].device_kind
  print(f"attention B={b} S={s} H={h} KV={kv} D={d} {args.dtype} on {device}")
  print(f"{'mask':<8}{'impl':<8}{'pass':<18}{'ms':>10}{'TFLOP/s':>10}")
  for r in results:
    if r["ms"] is None:
      print(f"{r['mask']:<8}{r['impl']:<8}{r['pass']:<18}  failed: {r['error']}")
    else:
      print(f"{r['mask']:<8}{r['impl']:<8}{r['pass']:<18}{r['ms']:>10.3f}{r['tflops']:>10.2f}")

  record = {"benchmark": "pallas_attention", "device": device, "platform": platform,
            "jax_version": jax.__version__, "smoke": args.smoke,
            "shape": {"batch": b, "seq": s, "heads": h, "kv_heads": kv, "head_dim": d,
                      "dtype": args.dtype, "group_span": args.group_span},
            "flops_note": "allowed (query, key) pairs x 4*D forward, x 10*D forward+backward",
            "results": results}
  write_json(record, f"pallas_attention{'_smoke' if args.smoke else ''}", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
