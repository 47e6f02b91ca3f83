"""ERNIE 4.5 import: time and peak host memory on a synthetic 21B-A3B-shaped slice (CPU).

  python benchmarks/ernie45_import.py                       # 1 dense + 1 MoE layer, ~2.2 GB
  python benchmarks/ernie45_import.py --moe_layers=3 --dir=/tmp/ernie45_slice

Writes an ERNIE-4.5-21B-A3B-shaped checkpoint with fewer layers (real widths: hidden 2560,
20 heads of 128, 4 kv heads, dense FFN 12288, 64 experts of 1536, 2 shared, vocab 103424,
tied; bf16, the gate and correction bias float32, one safetensors shard per layer plus
model.safetensors.index.json), then runs `--mode=import` on it in a child process and
reports its wall time and peak RSS next to the largest tensor, the largest stacked
parameter (the MoE expert weights of all MoE layers) and the checkpoint's size.
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTHS = dict(hidden_size=2560, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
              intermediate_size=12288, moe_intermediate_size=1536, moe_num_experts=64,
              moe_k=6, moe_num_shared_experts=2, vocab_size=103424)


def _fill(shape, dtype, rng):
  """A cheap pseudo-random tensor: a random block tiled to shape."""
  block = (0.02 * rng.standard_normal(1 << 16)).astype(np.float32)
  return np.resize(block, shape).astype(dtype)


def write_slice(directory: pathlib.Path, moe_layers: int) -> dict:
  """Writes the synthetic checkpoint; returns its config.json."""
  w, bf16 = WIDTHS, ml_dtypes.bfloat16
  layers = 1 + moe_layers
  config = dict(WIDTHS, architectures=["Ernie4_5_MoeForCausalLM"], model_type="ernie4_5_moe",
                num_hidden_layers=layers, moe_layer_start_index=1, moe_layer_end_index=-1,
                moe_layer_interval=1, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_theta=500000.0, use_bias=False, hidden_act="silu", dtype="bfloat16")
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  d, hd = w["hidden_size"], w["head_dim"]
  weight_map, shard_files = {}, []

  def shard(tensors, i):
    name = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(tensors, directory / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    shard_files.append(name)

  shard({"model.embed_tokens.weight": _fill((w["vocab_size"], d), bf16, rng),
         "model.norm.weight": np.ones(d, bf16)}, 0)
  for i in range(layers):
    p = f"model.layers.{i}."
    t = {p + "input_layernorm.weight": np.ones(d, bf16),
         p + "post_attention_layernorm.weight": np.ones(d, bf16),
         p + "self_attn.q_proj.weight": _fill((w["num_attention_heads"] * hd, d), bf16, rng),
         p + "self_attn.k_proj.weight": _fill((w["num_key_value_heads"] * hd, d), bf16, rng),
         p + "self_attn.v_proj.weight": _fill((w["num_key_value_heads"] * hd, d), bf16, rng),
         p + "self_attn.o_proj.weight": _fill((d, w["num_attention_heads"] * hd), bf16, rng)}
    if i == 0:
      f = w["intermediate_size"]
      t.update({p + "mlp.gate_proj.weight": _fill((f, d), bf16, rng),
                p + "mlp.up_proj.weight": _fill((f, d), bf16, rng),
                p + "mlp.down_proj.weight": _fill((d, f), bf16, rng)})
    else:
      f, e = w["moe_intermediate_size"], w["moe_num_experts"]
      t[p + "mlp.gate.weight"] = _fill((e, d), np.float32, rng)
      t[p + "mlp.moe_statics.e_score_correction_bias"] = np.zeros((1, e), np.float32)
      for j in range(e):
        q = f"{p}mlp.experts.{j}."
        t.update({q + "gate_proj.weight": _fill((f, d), bf16, rng),
                  q + "up_proj.weight": _fill((f, d), bf16, rng),
                  q + "down_proj.weight": _fill((d, f), bf16, rng)})
      s = f * w["moe_num_shared_experts"]
      t.update({p + "mlp.shared_experts.gate_proj.weight": _fill((s, d), bf16, rng),
                p + "mlp.shared_experts.up_proj.weight": _fill((s, d), bf16, rng),
                p + "mlp.shared_experts.down_proj.weight": _fill((d, s), bf16, rng)})
    shard(t, i + 1)
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps(config))
  return config


def _peak_rss_gib(code: str) -> tuple[float, float]:
  """(wall seconds, peak RSS GiB) of `python -c code` in a child process."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", code], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  wall = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children.
  return wall, max(peak, before) / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--moe_layers", type=int, default=1)
  parser.add_argument("--dir", default="/tmp/ernie45_slice")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  src, dst = pathlib.Path(args.dir) / "hf", pathlib.Path(args.dir) / "imported"
  shutil.rmtree(args.dir, ignore_errors=True)
  start = time.perf_counter()
  write_slice(src, args.moe_layers)
  write_s = time.perf_counter() - start
  sizes = {}
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  for path in src.glob("*.safetensors"):
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        s = f.get_slice(name)
        sizes[name] = int(np.prod(s.get_shape())) * (4 if s.get_dtype() == "F32" else 2)
  # The baseline: the interpreter with jax, flax, orbax and the package imported.
  base_s, base_gib = _peak_rss_gib("import ernie5_jax.interop.ernie45")
  code = (f"from ernie5_jax.interop import ernie45; "
          f"ernie45.import_checkpoint({str(src)!r}, {str(dst)!r})")
  wall, peak_gib = _peak_rss_gib(code)
  report = json.loads((dst / "import.json").read_text())
  w = WIDTHS
  stacked = args.moe_layers * w["moe_num_experts"] * w["hidden_size"] * w[
      "moe_intermediate_size"] * 2
  record = {
      "shape": dict(WIDTHS, num_hidden_layers=1 + args.moe_layers, dense_layers=1),
      "checkpoint_gib": round(sum(sizes.values()) / 2**30, 3),
      "largest_tensor_gib": round(max(sizes.values()) / 2**30, 3),
      "largest_stacked_parameter_gib": round(stacked / 2**30, 3),
      "tensors": len(sizes), "param_dtype": report["param_dtype"],
      "write_synthetic_s": round(write_s, 1),
      "import_wall_s": round(wall, 1), "import_reported_s": report["seconds"],
      "interpreter_startup_s": round(base_s, 1),
      "peak_rss_gib": round(peak_gib, 3), "baseline_rss_gib": round(base_gib, 3),
      "machine": f"{os.cpu_count()} CPU cores, JAX_PLATFORMS=cpu",
  }
  print(json.dumps(record, indent=2))
  common.write_json(record, "ernie45_import", args.out)
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
