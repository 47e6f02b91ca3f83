"""Decode speed of the elastic family: KV-cache greedy decoding of each exported sub-model.

  python benchmarks/decode_speed.py --checkpoint=workdirs/abl_elastic [--batch 8]
  python benchmarks/decode_speed.py --variant=S   # experiments/tiny.py resized, fresh init
  python benchmarks/decode_speed.py --preset=small  # vs transformers' generate (side env)

Each family member is cut out of the full model (elastic_export.export_submodel: its
layers, its experts, its top-k) and decoded with the generation module's compiled text
step. Rounds alternate between the sub-models (compiles excluded) and the median
tokens/s per sub-model is reported, with the speed-up of each over the full model; the
issue #5 target is >= 1.2x for the half-top-k member. Writes
benchmarks/results/decode_speed.json.

--preset=small|medium instead compares the decode of one text-only model
(benchmarks/presets.py) with `transformers`' generate (static KV cache) at batch 1 and 8,
side by side in alternating rounds: benchmarks/compare_frameworks.py --skip_train (it needs
the side environment with torch, --side_python).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from flax import nnx

from benchmarks.common import write_json
from ernie5_jax import distributed, elastic_export, store
from ernie5_jax.generate.decode import CachedDecoder
from ernie5_jax.eval.samples import decode_tokens_per_sec
from ernie5_jax.model import elastic
from ernie5_jax.model.decoder import apply_variant, create_model


def main() -> None:
  """Times every family member's decode; prints and writes the table."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="", help="workdir / checkpoint (default: init)")
  parser.add_argument("--variant", default="", help="decoder.VARIANTS size for a fresh init")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default=None)
  parser.add_argument("--preset", default="", help="compare with transformers (docstring)")
  parser.add_argument("--side_python", default="/work/side-venv/bin/python")
  args = parser.parse_args()
  if args.preset:
    from benchmarks import compare_frameworks  # pylint: disable=g-import-not-at-top
    compare_frameworks.main([f"--preset={args.preset}", "--skip_train",
                             f"--side_python={args.side_python}", f"--rounds={args.rounds}",
                             f"--decode_tokens={args.new_tokens}",
                             f"--out={args.out or ''}"])
    return

  if args.checkpoint:
    config, model = store.restore_model(args.checkpoint)
  else:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = runpy.run_path(os.path.join(root, "experiments", "tiny.py"))["get_config"]()
    if args.variant:
      apply_variant(config.model, args.variant)
    model = create_model(config)
  subs = elastic.family(config)
  decoders = {}
  for sub in subs:
    sub_config, sub_state = elastic_export.export_submodel(config, nnx.state(model), sub)
    sub_model = elastic_export.build_model(sub_config, sub_state)
    decoders[sub] = (sub_config, sub_model, CachedDecoder(sub_model))
  speeds = {sub: [] for sub in subs}
  for _ in range(args.rounds):  # Alternate, so load changes hit every sub-model alike.
    for sub, (sub_config, sub_model, dec) in decoders.items():
      speeds[sub].append(decode_tokens_per_sec(
          sub_config, sub_model, batch=args.batch, prompt_len=args.prompt_len,
          new_tokens=args.new_tokens, decoder=dec))
  full = elastic.full_submodel(config)
  base = float(np.median(speeds[full]))
  rows = []
  print(f"{'sub-model (depth,experts,top_k)':<34}{'active/tok':>12}{'tokens/s':>12}"
        f"{'vs full':>9}")
  for sub in subs:
    median = float(np.median(speeds[sub]))
    active = elastic_export.param_counts(config, sub)["active_per_token"]
    rows.append({"submodel": str(sub), "depth": sub.depth, "experts": sub.experts,
                 "top_k": sub.top_k, "active_params_per_token": active,
                 "tokens_per_sec": median, "all_rounds": speeds[sub],
                 "speedup_vs_full": median / base})
    print(f"{str(sub):<34}{active:>12,}{median:>12.0f}{median / base:>8.2f}x")
  write_json({"benchmark": "decode_speed",
              "checkpoint": args.checkpoint or f"init tiny.py {args.variant}".strip(),
              "backend": jax.default_backend(), "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "load_average": list(os.getloadavg()), "rows": rows},
             "decode_speed", args.out)


if __name__ == "__main__":
  main()
