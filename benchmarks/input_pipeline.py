"""Benchmark: tokens/s the multimodal input pipeline delivers (experiments/tiny.py shapes).

Runs make_multimodal_pipeline (TFDS ArrayRecord source -> shuffle -> tokenize ->
first-fit pack -> batch) at seq_len 64, batch 8 on one thread, after a warm-up
that fills the per-record memo (codec codes, documents). Reports batch slots/s
and real (non-padding) tokens/s; the issue's target is >= 10x the tokens/s the
tiny train step consumes (benchmarks/train_step.py).

  python benchmarks/input_pipeline.py [--data_dir DIR] [--batches 1000]

Prints the figures and writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ernie5_jax.input_pipeline import multimodal  # noqa: E402


def main() -> None:
  """Measures steady-state and cold-start throughput of the pipeline."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: the pipeline's)")
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=1000)
  parser.add_argument("--warmup", type=int, default=1500)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                           "input_pipeline.json"))
  args = parser.parse_args()

  start = time.perf_counter()
  pipe = multimodal.make_multimodal_pipeline({"data_dir": args.data_dir or None},
                                             seq_len=args.seq_len, batch_size=args.batch_size,
                                             seed=0)
  it = pipe.iterator()
  next(it)
  first_batch_s = time.perf_counter() - start

  def run(n):
    t, slots, real = time.perf_counter(), 0, 0
    for _ in range(n):
      b = next(it)
      slots += b["tokens"].size
      real += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t
    return slots / dt, real / dt

  cold_slots, cold_real = run(args.warmup)
  slots, real = run(args.batches)
  result = {"seq_len": args.seq_len, "batch_size": args.batch_size,
            "first_batch_seconds": first_batch_s,
            "cold_tokens_per_s": cold_slots, "cold_real_tokens_per_s": cold_real,
            "tokens_per_s": slots, "real_tokens_per_s": real, "fill": real / slots,
            "vocab_size": pipe.layout.vocab_size}
  print(f"first batch (build/fit if needed): {first_batch_s:.1f} s")
  print(f"cold ({args.warmup} batches): {cold_slots:,.0f} tokens/s ({cold_real:,.0f} real)")
  print(f"steady ({args.batches} batches): {slots:,.0f} tokens/s ({real:,.0f} real, "
        f"fill {real / slots:.2f})")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
