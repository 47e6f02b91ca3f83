"""--mode=compile: the real train step (and KV-cache decode step) compiled for a named
topology from a CPU host, and what the compiler says of it (after MaxText's train_compile).

  python -m ernie5_jax.main --mode=compile --config=experiments/pod_tpu_v5p.py:S \
      --topology=v5p:2x2x2 --workdir=workdirs/compile_S

TPU slices are compiled by libtpu's compiler for abstract devices of the topology
(aot/chips.py); the program is the trainer's own: the same abstract state, shardings, mesh
and jitted step (train/step.py), traced under the layout with the target platform, so the
ops layer picks the TPU backends (Pallas Mosaic kernels inside shard_map) as on a pod.
GPU counts ("h100:16") are lowered for CUDA only (no GPU, no compiler): the report then
has kernels and collectives of the lowered program but no memory or cost figures.

Per program and per chip the report gives: HBM by kind (arguments, outputs, temporaries;
donated buffers counted once) and whether the peak fits the chip; model FLOPs
(model/flops.py) beside XLA's cost analysis (FLOPs and HBM bytes; it counts a while body,
i.e. the scanned layer stack, once, so for scanned models it is a per-layer-stack figure,
not a per-step one); collectives by kind with bytes per step (aot/hlo.py, loop trip counts
applied); the Mosaic kernels (so interpret mode cannot slip in); a roofline step time,
max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / link bandwidth) with the
larger of the two FLOP counts, and the MFU bound it implies; the compile time. A program that does not fit raises
DoesNotFitError naming the config fields to change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline, sharding
from ernie5_jax.aot import chips, hlo
from ernie5_jax.generate import decode
from ernie5_jax.model import create_model, flops
from ernie5_jax.model import kv_cache as cache_lib
from ernie5_jax.train import optimizer
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib

GIB = 2**30
_FIX = ("lower config.data.global_batch_size or config.data.seq_len, set "
        "config.model.remat=True, raise config.mesh.fsdp (shards parameters and optimizer "
        "state), or pick a --topology with more chips")


class DoesNotFitError(ValueError):
  """The compiled program needs more HBM per chip than the topology's chips have."""


@dataclasses.dataclass
class ProgramReport:
  """What the compiler says of one program on one topology, per chip (module doc)."""
  program: str  # "train_step" or "decode_step"
  compile_seconds: float
  model_flops: float
  collectives: dict[str, dict[str, float]]
  kernels: dict[str, int]
  memory: dict[str, float] | None = None  # bytes: arguments, outputs, temporaries, aliased, peak
  xla_flops: float | None = None
  bytes_accessed: float | None = None
  roofline_seconds: float | None = None
  mfu_bound: float | None = None
  fits: bool | None = None


def _train_program(config, layout):
  """(jitted train step, abstract args) of the trainer, sharded as train/loop.py does."""
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  state_sharding = sharding.tree_shardings(abstract, layout)
  abstract = sharding.with_shardings(abstract, state_sharding)
  data_sharding = sharding.batch_sharding(layout, config.data.global_batch_size)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding)
           for k, v in input_pipeline.batch_spec(config).items()}
  step = step_lib.make_train_step(
      config, graphdef, tx, schedule,
      **sharding.step_shardings(layout, state_sharding, data_sharding))
  return step, (abstract, batch)


def _decode_program(config, layout):
  """(jitted one-token KV-cache decode step, abstract args): global_batch_size rows, seq_len slots."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(config)))
  state = sharding.with_shardings(abstract, sharding.tree_shardings(abstract, layout))
  m, rows, slots = config.model, config.data.global_batch_size, config.data.seq_len
  layers = m.num_layers
  kv = layout.dividing_axes("kv_heads", m.num_kv_heads) or None
  row = layout.dividing_axes(sharding.BATCH, rows) or None
  put = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(layout.mesh, spec))
  dtype = jnp.dtype(m.dtype)
  cache = cache_lib.KVCache(
      k=put((layers, rows, slots, m.num_kv_heads, m.head_dim), dtype,
            PartitionSpec(None, row, None, kv, None)),
      v=put((layers, rows, slots, m.num_kv_heads, m.head_dim), dtype,
            PartitionSpec(None, row, None, kv, None)),
      segment_ids=put((rows, slots), jnp.int32, PartitionSpec(row, None)),
      group_ids=put((rows, slots), jnp.int32, PartitionSpec(row, None)),
      index=put((), jnp.int32, PartitionSpec()))
  ids = lambda *shape: put((rows, 1) + shape, jnp.int32, PartitionSpec(row, *(None,) * (
      1 + len(shape))))
  inputs = decode.StepInputs(tokens=ids(), positions=ids(3), segment_ids=ids(), group_ids=ids(),
                             audio_codes=ids(m.audio_levels))

  def decode_step(state, cache, inputs):
    model = nnx.merge(graphdef, state)
    logits, aux = model(inputs.tokens, inputs.positions, inputs.segment_ids, inputs.group_ids,
                        inputs.audio_codes, cache=cache)
    return logits, aux["cache"]  # [rows, 1, vocab] float32

  return jax.jit(decode_step, donate_argnames=("cache",)), (state, cache, inputs)


def _oom_message(error: Exception) -> str | None:
  """The compiler's out-of-memory sentence, if `error` is one."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  found = re.search(r"(Ran out of memory[^\n]*|Used [^\n]*hbm[^\n]*)", text)
  return (found.group(1) if found else text.splitlines()[0]).strip()[:300]


def _report_compiled(name, compiled, seconds, model_flops, chip: chips.Chip) -> ProgramReport:
  summary = hlo.summarize(compiled.as_text())
  mem = compiled.memory_analysis()
  memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
            "code": mem.generated_code_size_in_bytes}
  memory["peak"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                    + memory["temporaries"] + memory["code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  xla_flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  link_bytes = sum(c["bytes"] for c in summary.collectives.values())
  roofline = max(max(xla_flops, model_flops) / chip.peak_flops,
                 accessed / chip.hbm_bytes_per_sec, link_bytes / chip.link_bytes_per_sec)
  return ProgramReport(
      program=name, compile_seconds=seconds, model_flops=model_flops,
      collectives=summary.collectives,
      kernels={"mosaic_kernels": summary.mosaic_kernels, "mosaic_calls": summary.mosaic_calls},
      memory=memory, xla_flops=xla_flops, bytes_accessed=accessed,
      roofline_seconds=roofline,
      mfu_bound=model_flops / (roofline * chip.peak_flops) if roofline else None,
      fits=memory["peak"] <= chip.hbm_bytes)


def compile_program(name: str, fn, args, layout: sharding.Layout, topology: chips.Topology,
                    model_flops: float) -> ProgramReport:
  """Lowers fn(*args) under `layout` for the topology's platform; compiles it for TPUs."""
  start = time.perf_counter()
  with sharding.use_layout(layout):
    traced = fn.trace(*args)
  if topology.chip.platform != "tpu":
    lowered = traced.lower(lowering_platforms=(topology.chip.platform,))
    text = lowered.as_text()
    return ProgramReport(program=name, compile_seconds=time.perf_counter() - start,
                         model_flops=model_flops,
                         collectives={k: {"count": n} for k, n in
                                      hlo.count_lowered_collectives(text).items()},
                         kernels=hlo.count_lowered_kernels(text))
  try:
    compiled = traced.lower().compile()
  except Exception as e:  # XLA's RESOURCE_EXHAUSTED carries no type of its own.
    oom = _oom_message(e)
    if oom is None:
      raise
    raise DoesNotFitError(f"{name} does not fit {topology.chip.name} HBM "
                          f"({topology.chip.hbm_bytes / GIB:.0f} GiB per chip) on "
                          f"{topology.name}: the compiler says '{oom}'; {_FIX}") from None
  report = _report_compiled(name, compiled, time.perf_counter() - start, model_flops,
                            topology.chip)
  return report


def compile_for_topology(config: ml_collections.ConfigDict, topology_name: str, *,
                         programs: tuple[str, ...] = ("train_step", "decode_step")
                         ) -> dict[str, Any]:
  """Compiles `programs` of config for the topology; returns the report (module doc).

  Raises ConfigError (bad topology or a mesh that does not fit it) and DoesNotFitError.
  """
  input_pipeline.validate(config)
  topology = chips.parse_topology(topology_name)
  if topology.chip.platform == "tpu":
    devices = chips.tpu_devices(topology)
  else:  # Lowering only: host devices stand in for the GPUs.
    devices = jax.devices()
    if len(devices) != topology.num_devices:
      raise config_lib.ConfigError(
          f"--topology={topology_name!r} needs {topology.num_devices} host devices to lower "
          f"for, this process has {len(devices)}: run it through --mode=compile (which sets "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={topology.num_devices})")
  layout = sharding.make_layout(config, devices, platform=topology.chip.platform)
  n = topology.num_devices
  tokens = config.data.global_batch_size * config.data.seq_len
  builders = {
      "train_step": (_train_program, flops.train_flops_per_token(config) * tokens / n),
      "decode_step": (_decode_program, flops.decode_flops_per_token(
          config, config.data.seq_len) * config.data.global_batch_size / n),
  }
  reports = []
  for name in programs:
    build, model_flops = builders[name]
    fn, args = build(config, layout)
    report = compile_program(name, fn, args, layout, topology, model_flops)
    reports.append(report)
    if report.fits is False:
      raise DoesNotFitError(
          f"{name} needs {report.memory['peak'] / GIB:.1f} GiB per chip, {topology.chip.name} "
          f"has {topology.chip.hbm_bytes / GIB:.0f} GiB ({topology.name}): {_FIX}")
  return {"topology": topology.name, "chip": topology.chip.name, "devices": n,
          "mesh": dict(layout.axis_sizes), "platform": topology.chip.platform,
          "jax_version": jax.__version__,
          "programs": [dataclasses.asdict(r) for r in reports]}


def format_report(report: dict[str, Any]) -> str:
  """The report as a few lines of text per program."""
  mesh = " x ".join(f"{a}={s}" for a, s in report["mesh"].items())
  lines = [f"{report['topology']} ({report['devices']} x {report['chip']}), mesh {mesh}"]
  for p in report["programs"]:
    lines.append(f"  {p['program']}: compiled in {p['compile_seconds']:.1f} s")
    if p["memory"]:
      m = {k: v / GIB for k, v in p["memory"].items()}
      lines.append(f"    HBM per chip: {m['peak']:.2f} GiB peak ({'fits' if p['fits'] else 'DOES NOT FIT'}"
                   f"): arguments {m['arguments']:.2f}, outputs {m['outputs']:.2f} "
                   f"(aliased {m['aliased']:.2f}), temporaries {m['temporaries']:.2f}")
      lines.append(f"    FLOPs per chip: model {p['model_flops'] / 1e12:.3f} T; XLA cost analysis "
                   f"{p['xla_flops'] / 1e12:.3f} T and {p['bytes_accessed'] / GIB:.2f} GiB "
                   "of HBM traffic (a loop body counted once)")
      lines.append(f"    roofline step {1e3 * p['roofline_seconds']:.2f} ms -> MFU bound "
                   f"{100 * p['mfu_bound']:.1f}%")
    else:
      lines.append(f"    model FLOPs per device {p['model_flops'] / 1e12:.3f} T (lowered only: "
                   "no compiler figures without the device)")
    coll = ", ".join(f"{k} {v['count']:g}" + (f" ({v['bytes'] / 2**20:.1f} MiB)"
                                              if "bytes" in v else "")
                     for k, v in sorted(p["collectives"].items())) or "none"
    lines.append(f"    collectives per step: {coll}")
    lines.append("    kernels: " + ", ".join(f"{k} {v}" for k, v in p["kernels"].items()))
  return "\n".join(lines)


def run_compile(config: ml_collections.ConfigDict, topology_name: str, workdir: str) -> dict:
  """--mode=compile: compile_for_topology, printed and written to workdir/compile_report.json."""
  report = compile_for_topology(config, topology_name)
  print(format_report(report), flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "compile_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report
