"""Benchmark: building the embedded datasets and fitting the tokenizers from scratch, offline.

Builds data/digits_multimodal and data/stdlib_text into a fresh temporary data_dir
(ArrayRecord, no network), fits the image / audio codebooks on the train split,
then reports on the held-out split the image tokenizer's PSNR for each number of
scales (images and video frames) and the audio codec's SNR for each number of RVQ
levels. The issue's target: everything builds in under 3 minutes on 2 cores.

  python benchmarks/data_build.py [--keep DIR]

Prints the figures and writes benchmarks/results/data_build.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import data as data_lib  # noqa: E402
from ernie5_jax.input_pipeline import tokenizers as tok_lib  # noqa: E402
from ernie5_jax.input_pipeline.tokenizers import audio as audio_lib  # noqa: E402
from ernie5_jax.input_pipeline.tokenizers import fit as fit_lib  # noqa: E402
from ernie5_jax.input_pipeline.tokenizers import image as image_lib  # noqa: E402


def main() -> None:
  """Times the builds and the tokenizer fit; reports reconstruction quality."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--keep", default="", help="data_dir to build into (default: a temp dir)")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_build.json"))
  args = parser.parse_args()
  data_dir = args.keep or tempfile.mkdtemp(prefix="ernie5_data_")

  seconds = {}
  total = time.perf_counter()
  for name in ("digits_multimodal", "stdlib_text"):
    start = time.perf_counter()
    b = data_lib.ensure_built(name, data_dir)
    seconds[name] = time.perf_counter() - start
    assert b.is_prepared()
  start = time.perf_counter()
  tok = tok_lib.ensure_tokenizers(data_dir, "digits_multimodal")
  seconds["fit_tokenizers"] = time.perf_counter() - start
  seconds["total"] = time.perf_counter() - total

  test = fit_lib.read_arrays(data_lib.builder("digits_multimodal", data_dir).as_data_source("test"))
  psnr = {}
  for kind in ("images", "frames"):
    codes = tok.image.encode(test[kind])
    psnr[kind] = {str(s): image_lib.psnr(test[kind], tok.image.decode(codes[:k + 1]))
                  for k, s in enumerate(tok.image.spec.scales)}
  codes = tok.audio.encode(test["audio"])
  snr = {str(k): audio_lib.snr_db(test["audio"], tok.audio.decode(codes[..., :k]))
         for k in range(1, tok.audio.spec.levels + 1)}

  result = {"data_dir": data_dir, "seconds": seconds, "target_seconds": 180,
            "image_psnr_db_by_top_scale": psnr, "audio_snr_db_by_levels": snr,
            "image_spec": vars(tok.image.spec), "audio_spec": vars(tok.audio.spec)}
  for name, s in seconds.items():
    print(f"{name:>18}: {s:6.1f} s")
  for kind, table in psnr.items():
    print(f"PSNR {kind:>6} by top scale: " + ", ".join(f"{k}: {v:.1f} dB" for k, v in table.items()))
  print("audio SNR by levels: " + ", ".join(f"{k}: {v:.1f} dB" for k, v in snr.items()))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=list) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
