"""Compile every pod experiment for its TPU topology from this CPU host: per-chip HBM, roofline.

For every pod experiment (pod_tpu_v5p.py S, B, L, ultra_1t.py, gpu_cluster.py B, L) the
real train step and the KV-cache decode step are compiled by libtpu for the experiment's
TOPOLOGY (ernie5_jax/aot, what `--mode=compile` runs): per-chip HBM by kind, model FLOPs,
roofline, collectives per step and kernels. The GPU rows are lowered for CUDA (kernels and
collectives of the lowered program) and, for their per-device HBM, compiled for as many
TPU v5p chips with the same mesh (V5P_SHAPES).

Each run compiles in its own process (libtpu keeps memory between compiles) and writes
benchmarks/results/pod_compile/<run>.json; finished runs are skipped, so an interrupted
table resumes. Where this host cannot compile a whole model, `--layers` compiles the same
per-chip shapes with fewer layers, and the table states the extrapolation.

  python benchmarks/pod_compile.py                      # S, B, L, 1T-A32 and the GPU rows
  python benchmarks/pod_compile.py --runs S --force     # one run again
  python benchmarks/pod_compile.py --collect_only       # rebuild the table from the JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import RESULTS, write_json  # noqa: E402
from ernie5_jax.aot import chips  # noqa: E402

GIB = 2**30
OUT = RESULTS / "pod_compile"
# v5p slice shapes by chip count: the GPU rows' per-device HBM is read off the same program
# compiled for as many v5p chips with the same mesh (XLA:GPU's buffer assignment differs
# somewhat; the per-device shapes are the same).
V5P_SHAPES = {8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}


def planned() -> dict[str, tuple[str, str | None, str]]:
  """run name -> (experiment file, config arg, topology), read from the experiments."""
  pod = runpy.run_path(str(ROOT / "experiments" / "pod_tpu_v5p.py"))
  gpu = runpy.run_path(str(ROOT / "experiments" / "gpu_cluster.py"))
  ultra = runpy.run_path(str(ROOT / "experiments" / "ultra_1t.py"))
  runs = {v: ("pod_tpu_v5p.py", v, t) for v, t in pod["TOPOLOGY"].items()}
  runs["1T-A32"] = ("ultra_1t.py", None, ultra["TOPOLOGY"])
  runs.update({f"gpu_{v}": ("gpu_cluster.py", v, t) for v, t in gpu["TOPOLOGY"].items()})
  return runs


def compile_one(name: str, layers: int | None) -> dict:
  """Runs in a child process: compiles one run, returns its record."""
  from ernie5_jax.aot import compile as aot  # pylint: disable=g-import-not-at-top
  experiment, arg, topology = planned()[name]
  get_config = runpy.run_path(str(ROOT / "experiments" / experiment))["get_config"]
  config = get_config(arg) if arg else get_config()
  full_layers = config.model.num_layers
  if layers:  # Same per-chip shapes, fewer layers (module doc).
    config.model.num_layers = layers
    config.model.num_dense_layers = min(config.model.num_dense_layers, layers - 1)
  start = time.perf_counter()
  report = aot.compile_for_topology(config, topology)
  print(aot.format_report(report))
  record = {"run": name, "config": f"experiments/{experiment}" + (f":{arg}" if arg else ""),
            "topology": topology, "layers_compiled": config.model.num_layers,
            "layers_full": full_layers, "report": report}
  target = chips.parse_topology(topology)
  if target.chip.platform != "tpu":  # No GPU compiler here: the same program on v5p chips.
    proxy = f"v5p:{V5P_SHAPES[target.num_devices]}"
    record["proxy_topology"] = proxy
    record["proxy_report"] = aot.compile_for_topology(config, proxy)
    print(aot.format_report(record["proxy_report"]))
  record["wall_seconds"] = time.perf_counter() - start
  return record


def table(records: list[dict]) -> str:
  """Markdown table, per chip: the compiler's HBM by kind, FLOPs, roofline, collectives, kernels."""
  head = ("| run | topology | layers compiled | train HBM peak GiB (arguments / temporaries) | "
          "model TFLOP per chip per step | roofline step ms | MFU bound | collectives per "
          "step (all-gather, all-reduce, all-to-all, ragged all-to-all) | kernels | decode "
          "HBM GiB | compile s |")
  lines = [head, "|" + "---|" * 11]
  for r in records:
    memory_report = r.get("proxy_report", r["report"])  # GPU rows: the v5p proxy compile
    progs = {p["program"]: p for p in memory_report["programs"]}
    lowered = {p["program"]: p for p in r["report"]["programs"]}
    t, d, lt = progs["train_step"], progs["decode_step"], lowered["train_step"]
    # Collectives of the compiled program (GPU rows: the proxy's; the lowered CUDA program
    # holds only shard_map's explicit ones, GSPMD adds the rest when it compiles).
    coll = ", ".join(f"{t['collectives'].get(k, {}).get('count', 0):g}" for k in
                     ("all-gather", "all-reduce", "all-to-all", "ragged-all-to-all"))
    m = t["memory"]
    kernels = ", ".join(f"{v} {k.split('_')[0]}" for k, v in lt["kernels"].items()
                        if k != "mosaic_calls" and v)
    where = r["topology"] + (f" (HBM: {r['proxy_topology']})" if "proxy_topology" in r else "")
    lines.append(
        f"| {r['run']} | {where} | {r['layers_compiled']} of {r['layers_full']} | "
        f"{m['peak'] / GIB:.2f} ({m['arguments'] / GIB:.2f} / {m['temporaries'] / GIB:.2f}) | "
        f"{t['model_flops'] / 1e12:.2f} | {1e3 * t['roofline_seconds']:.1f} | "
        f"{100 * t['mfu_bound']:.0f}% | {coll} | {kernels} | {d['memory']['peak'] / GIB:.2f} | "
        f"{t['compile_seconds'] + d['compile_seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  """Compiles the runs (one child process each), prints the table, writes the JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=",".join(planned()))
  parser.add_argument("--layers", type=int, default=None,
                      help="compile this many layers (same per-chip shapes)")
  parser.add_argument("--force", action="store_true", help="recompile finished runs")
  parser.add_argument("--collect_only", action="store_true")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    record = compile_one(args.child, args.layers)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.child}.json").write_text(json.dumps(record, indent=1))
    return 0
  names = args.runs.split(",")
  for name in names:
    if name not in planned():
      sys.exit(f"error: --runs={name!r} is not accepted: expected names from {list(planned())}")
    done = (OUT / f"{name}.json").exists()
    if args.collect_only or (done and not args.force):
      continue
    cmd = [sys.executable, __file__, "--child", name]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    topology = chips.parse_topology(planned()[name][2])
    if topology.chip.platform != "tpu":  # Host devices stand in for the GPUs.
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={topology.num_devices}"
    if args.layers:
      cmd += ["--layers", str(args.layers)]
    print(f"compiling {name} ...", flush=True)
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode:
      print(f"{name}: failed (exit {result.returncode})", flush=True)
  records = [json.loads((OUT / f"{n}.json").read_text()) for n in planned()
             if (OUT / f"{n}.json").exists()]
  text = table(records)
  print(text)
  (RESULTS / "pod_compile.md").write_text(text + "\n")
  write_json({"benchmark": "pod_compile", "rows": records}, "pod_compile")
  return 0


if __name__ == "__main__":
  sys.exit(main())
