"""Per-device memory of the large configs on their pod meshes, planned without allocating.

For each experiment (variant S, B, L on TPU v5p slices, B and L on GPU nodes, 1T-A32 on a
v5p-2048 slice) the train state is `jax.eval_shape`'d, its shardings are computed on an
AbstractMesh of the planned device count (ernie5_jax/sharding.py: the same rules the
trainer uses), and each leaf's per-device bytes are its shard shape times its itemsize:

  params      parameters (config.model.param_dtype)
  grads       one gradient per parameter, same sharding (live during the update)
  optimizer   AdamW moments (+ counters), sharded like the parameters
  activations an estimate (below), per device: T = tokens per device (global batch x seq /
              batch shards; tensor shards hold the same tokens), b = bytes of model.dtype
  total       the sum

Activation estimate (per device), from the block structure (model/decoder.py):
  per-layer live set  a = T * b * [4 D + (2 H + 2 KV) Dh / tp + 2 F_dense / tp]   (attention,
                      norms, residuals, dense MLP), MoE layers with
                      T * b * [3 D + 2 (H + KV) Dh / tp + r K (D + 3 F / tp) + 3 S F / tp]
                      where r K = rows per token of the expert layout (r = the exchange
                      capacity factor, or the expert shards n when dropless) and S the shared
                      experts; plus the all-to-all buffers 3 r K T D b under expert parallelism
  saved               model.remat: the L block inputs, L * T * D * b, plus one layer's live
                      set (recomputed in the backward pass); otherwise every layer's live set
  logits              T * V / tp * 4 bytes * 2 (float32 logits and their gradient)
Attention scores are not counted (flash attention on TPU/GPU keeps them in VMEM/SRAM).

  python benchmarks/memory_table.py          # a few seconds; no device memory is touched

Prints the table and writes benchmarks/results/memory_table.json.
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import RESULTS, write_json  # noqa: E402
from ernie5_jax import config as config_lib  # noqa: E402
from ernie5_jax import sharding  # noqa: E402
from ernie5_jax.train import optimizer  # noqa: E402
from ernie5_jax.train import state as state_lib  # noqa: E402

GIB = 2**30


def planned_runs() -> list[tuple[str, str, str | None, int]]:
  """(name, experiment file, config arg, devices) of every row, read from the experiments."""
  pod = runpy.run_path(str(ROOT / "experiments" / "pod_tpu_v5p.py"))
  gpu = runpy.run_path(str(ROOT / "experiments" / "gpu_cluster.py"))
  ultra = runpy.run_path(str(ROOT / "experiments" / "ultra_1t.py"))
  rows = [(f"{v} / TPU v5p x{n}", "pod_tpu_v5p.py", v, n) for v, n in pod["SLICE_CHIPS"].items()]
  rows += [(f"{v} / GPU x{n}", "gpu_cluster.py", v, n) for v, n in gpu["GPUS"].items()]
  rows.append((f"1T-A32 / TPU v5p x{ultra['SLICE_CHIPS']}", "ultra_1t.py", None,
               ultra["SLICE_CHIPS"]))
  return rows


def activation_bytes(config, layout: sharding.Layout) -> int:
  """The activation estimate of the module docstring, bytes per device."""
  m, d = config.model, config.data
  b = np.dtype(m.dtype).itemsize
  tokens = d.global_batch_size * d.seq_len // layout.size(layout.axes(sharding.BATCH))
  tp = layout.size(layout.axes("mlp"))
  ep = layout.size(layout.axes("expert"))
  rows = (config.mesh.expert_capacity_factor or ep) if ep > 1 else 1.0
  attn = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim / tp
  dense = tokens * b * (4 * m.d_model + attn + 2 * m.dense_hidden / tp)
  moe = tokens * b * (3 * m.d_model + attn + rows * m.top_k * (
      m.d_model + 3 * m.expert_hidden / tp) + 3 * m.num_shared_experts * m.expert_hidden / tp)
  if ep > 1:
    moe += 3 * rows * m.top_k * tokens * m.d_model * b
  num_moe = m.num_layers - m.num_dense_layers
  if m.remat:
    saved = m.num_layers * tokens * m.d_model * b + max(dense if m.num_dense_layers else 0,
                                                        moe if num_moe else 0)
  else:
    saved = m.num_dense_layers * dense + num_moe * moe
  logits = tokens * m.vocab_size / layout.size(layout.axes("vocab")) * 4 * 2
  return int(saved + logits)


def memory_row(name: str, experiment: str, arg: str | None, devices: int) -> dict:
  """One table row: the config's per-device bytes on an abstract mesh of `devices`."""
  get_config = runpy.run_path(str(ROOT / "experiments" / experiment))["get_config"]
  config = get_config(arg) if arg else get_config()
  config_lib.validate(config)
  layout = sharding.abstract_layout(config, devices)
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(config, tx)
  shardings = sharding.tree_shardings(abstract, layout)
  params = sharding.bytes_per_device(abstract.params, shardings.params)
  opt = sharding.bytes_per_device(abstract.opt_state, shardings.opt_state)
  acts = activation_bytes(config, layout)
  return {
      "run": name, "config": f"experiments/{experiment}" + (f":{arg}" if arg else ""),
      "devices": devices, "mesh": dict(layout.axis_sizes),
      "params_total": state_lib.num_params(abstract.params),
      "tokens_per_device": config.data.global_batch_size * config.data.seq_len
      // layout.size(layout.axes(sharding.BATCH)),
      "params_gib": params / GIB, "grads_gib": params / GIB, "optimizer_gib": opt / GIB,
      "activations_gib": acts / GIB, "total_gib": (2 * params + opt + acts) / GIB,
  }


def format_table(rows: list[dict]) -> str:
  """The rows as a Markdown table."""
  head = ("| run | mesh (data x fsdp x expert x tensor) | params | tokens/device | "
          "params GiB | grads GiB | optimizer GiB | activations GiB | total GiB |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    mesh = " x ".join(str(r["mesh"][a]) for a in config_lib.MESH_AXES)
    lines.append(f"| {r['run']} | {mesh} | {r['params_total'] / 1e9:.3g}B | "
                 f"{r['tokens_per_device']} | {r['params_gib']:.2f} | {r['grads_gib']:.2f} | "
                 f"{r['optimizer_gib']:.2f} | {r['activations_gib']:.2f} | "
                 f"{r['total_gib']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  """Builds the table, prints it, writes the JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(RESULTS / "memory_table.json"))
  args = parser.parse_args(argv)
  rows = [memory_row(*run) for run in planned_runs()]
  print(format_table(rows))
  write_json({"benchmark": "memory_table", "jax_version": jax.__version__,
              "units": "GiB per device", "rows": rows}, "memory_table", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
