"""Benchmark: train-step throughput, model-FLOPs utilisation, compile time and a per-op breakdown.

Runs the real jitted train step (ernie5_jax.train.step) of an experiment config or of a
comparison preset (benchmarks/presets.py: text only, no MTP or audio heads, the model
`transformers` can hold too) on pre-staged batches, so the figure is the step alone,
not the input pipeline. Model FLOPs are counted analytically (ernie5_jax/model/flops.py:
PaLM App. B). MFU is against an f32 matmul rate measured in the same run. The step must
compile exactly once over all the steps.

  python benchmarks/train_step.py                          # experiments/tiny.py, 50 steps
  python benchmarks/train_step.py --preset=small --steps=20 --breakdown
  python benchmarks/train_step.py --config=experiments/tiny.py --steps=100

--breakdown traces a few steps with XLA's per-thunk trace events and sums each compiled
HLO op's time, grouped by what the op computes (attention, MoE dispatch, cross-entropy,
optimizer, ...: read from the op's source metadata) and by pass (forward / backward /
update). Prints the figures and writes benchmarks/results/train_step[_PRESET].json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import resource
import runpy
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
TOP_OPS = 25  # ops listed by --breakdown


def matmul_flops_per_sec(n: int = 1024, iters: int = 10) -> float:
  """Measured rate of one f32 [n, n] x [n, n] matmul (the roofline MFU is taken against)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
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


def load_config(preset: str, config_path: str):
  """The config of --preset (benchmarks/presets.py) or of the experiment file --config."""
  if preset:
    from benchmarks.presets import preset_config  # pylint: disable=g-import-not-at-top
    return preset_config(preset)
  from ernie5_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(config_path)["get_config"]()
  config_lib.validate(config)
  return config


class StepRunner:
  """The jitted train step of a config, its state and staged batches: timed in rounds."""

  def __init__(self, config, num_batches: int, *, single_segment: bool = False):
    import jax  # pylint: disable=g-import-not-at-top
    from ernie5_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    from ernie5_jax.model import create_model  # pylint: disable=g-import-not-at-top
    from ernie5_jax.train import optimizer  # pylint: disable=g-import-not-at-top
    from ernie5_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    from ernie5_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    tx, schedule = optimizer.create_optimizer(config)
    self.graphdef, self.state = state_lib.init_train_state(lambda: create_model(config), tx)
    self.num_params = state_lib.num_params(self.state.params)
    self.step = step_lib.make_train_step(config, self.graphdef, tx, schedule)
    data = input_pipeline.create_train_iterator(config)
    batches = [next(data) for _ in range(num_batches)]
    if single_segment:  # one document per row: the plain causal LM `transformers` runs
      batches = [single_segment_batch(b) for b in batches]
    self.batches = [jax.device_put(b) for b in batches]  # staged: time the step only
    self.metrics = None
    self._next = 0

  def run(self, steps: int) -> float:
    """Runs `steps` steps (cycling the staged batches); returns their wall seconds."""
    import jax  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    for _ in range(steps):
      batch = self.batches[self._next % len(self.batches)]
      self._next += 1
      self.state, self.metrics = self.step(self.state, batch)
    jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - start

  def compiles(self) -> int:
    """How many times the train step was compiled so far."""
    return self.step._cache_size()  # pylint: disable=protected-access


def single_segment_batch(batch: dict) -> dict:
  """The batch as whole-row documents: segment 1, positions 0.., no groups, every target scored."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.asarray(batch["tokens"])  # [batch, seq]
  rows, seq = tokens.shape
  out = dict(batch)
  out["targets"] = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  out["segment_ids"] = np.ones_like(tokens)
  out["group_ids"] = np.zeros_like(tokens)
  positions = np.asarray(batch["positions"])  # [batch, seq, 3] (t, h, w): text has t = h = w
  index = np.arange(seq, dtype=positions.dtype)[None, :, None]
  out["positions"] = np.broadcast_to(index, positions.shape).copy()
  mask = np.ones((rows, seq), np.asarray(batch["loss_mask"]).dtype)
  mask[:, -1] = 0  # the last position has no next token
  out["loss_mask"] = mask
  out["modality"] = np.zeros_like(np.asarray(batch["modality"]))
  return out


# --- per-op breakdown -----------------------------------------------------------------------

# Ops whose thunks contain other ops' thunks (counted there): left out of the sums.
CONTAINERS = ("while", "conditional", "call")

# (category, regexp on an op's metadata "op_name | innermost project frame"), first match wins.
CATEGORIES = (
    # The windows' loop: nested in the layers' loop when they are scanned, alone when not.
    ("MoE experts (routed SwiGLU)", r"while/body/.*while/body|while/body/dot_general|"
                                    r"moe_windows\.py|moe_slots\.py|g[cdf]{2},g[cdf]{2}->g"),
    ("optimizer (AdamW, clip, norms)", r"optax|optimizer\.py|tree\.norm|params_finite"),
    ("router bias / loss EMA update", r"update_router_bias"),
    ("MoE routing + sort", r"router\.py|moe_dispatch\.py|model/moe\.py"),
    ("attention (scores, softmax, mask)", r"ops/attention\.py"),
    ("attention projections + RoPE", r"model/attention\.py|rope\.py"),
    ("output head + cross-entropy", r"objective\.py|tied_logits|Embed\.attend|OutputHead|logits"),
    ("dense / shared SwiGLU", r"swiglu|MLP"),
    ("norms, residuals, embedding", r"RMSNorm|Embed\.__call__|decoder\.py|heads\.py"),
)


def op_metadata(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: 'op_name | innermost project frame file:function:line'}.

  Reads the compiled module's stack-frame tables (FileNames, FunctionNames, FileLocations,
  StackFrames) that each instruction's metadata stack_frame_id points into.
  """
  tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
  section = ""
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
    elif not line.strip() or line.startswith(("HloModule", "ENTRY", "%", " ")):
      section = "" if not line.strip() else section
    if section and line != section and line.strip():
      key, _, value = line.partition(" ")
      tables[section][int(key)] = value.strip('"')
  def frames(fid: int, depth: int = 3) -> str:
    """The innermost `depth` project (ernie5_jax / optax) frames of a stack, innermost first."""
    found, seen = [], set()
    while fid and fid not in seen and len(found) < depth:
      seen.add(fid)
      entry = dict(re.findall(r"(\w+)=(\d+)", tables["StackFrames"].get(fid, "")))
      loc = dict(re.findall(r"(\w+)=(\d+)", tables["FileLocations"].get(
          int(entry.get("file_location_id", 0)), "")))
      file = tables["FileNames"].get(int(loc.get("file_name_id", 0)), "")
      if "ernie5_jax/" in file or "optax" in file:
        function = tables["FunctionNames"].get(int(loc.get("function_name_id", 0)), "")
        short = file.split("/site-packages/")[-1].split("ernie5_jax/", 1)[-1]
        found.append(f"{short}:{function}:{loc.get('line')}")
      fid = int(entry.get("parent_frame_id", 0)) - 1
    return " < ".join(found)
  out = {}
  pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z\-]+)\(.*metadata=\{op_name="
                       r"\"([^\"]*)\"(?: stack_frame_id=(\d+))?")
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m and m.group(2) not in CONTAINERS:
      out[m.group(1)] = f"{m.group(3)} | {frames(int(m.group(4) or 0))}"
  return out


def categorize(meta: str) -> tuple[str, str]:
  """(category, pass) of one op from its metadata (CATEGORIES; pass from transpose/jvp).

  The category whose pattern matches earliest in "op_name | frames, innermost first" wins,
  so an op is filed under the innermost code that names it.
  """
  best = (len(meta) + 1, "other")
  for name, pattern in CATEGORIES:
    found = re.search(pattern, meta)
    if found and found.start() < best[0]:
      best = (found.start(), name)
  category = best[1]
  if "transpose(" in meta or "_bwd" in meta or "backward" in meta:
    phase = "backward"
  elif category.startswith(("optimizer", "router bias")):
    phase = "update"
  else:
    phase = "forward"
  return category, phase


def breakdown(runner: StepRunner, steps: int) -> dict:
  """Per-op time of `steps` traced steps, grouped by category and pass (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  compiled = runner.step.lower(runner.state, runner.batches[0]).compile()
  meta = op_metadata(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    wall = runner.run(steps)
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op")
    if (e.get("ph") == "X" and op in meta
        and "train_step" in e["args"].get("hlo_module", "")):
      per_op[op] += e["dur"] / 1e3 / steps  # ms per step
  by_category, by_phase = collections.Counter(), collections.Counter()
  top = []
  for op, ms in per_op.most_common():
    category, phase = categorize(meta.get(op, ""))
    by_category[category] += ms
    by_phase[phase] += ms
    if len(top) < TOP_OPS:
      top.append({"op": op, "ms": ms, "category": category, "pass": phase,
                  "source": meta.get(op, "")[-160:]})
  total = sum(per_op.values())
  return {"traced_steps": steps, "step_ms_traced": 1e3 * wall / steps,
          "op_ms_per_step": total,
          "by_category_ms": dict(by_category.most_common()),
          "by_pass_ms": dict(by_phase.most_common()), "top_ops": top}


def print_breakdown(result: dict) -> None:
  """Prints a breakdown() result as two small tables and the top ops."""
  total = result["op_ms_per_step"]
  print(f"  per-op breakdown ({result['traced_steps']} traced steps, "
        f"{result['step_ms_traced']:.1f} ms/step wall, {total:.1f} ms/step summed over ops):")
  for name, ms in list(result["by_category_ms"].items()) + [("--", 0.0)] + \
      list(result["by_pass_ms"].items()):
    if name == "--":
      continue
    print(f"    {name:<38} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
  print("  top ops:")
  for row in result["top_ops"][:12]:
    print(f"    {row['ms']:7.1f} ms  {row['pass']:<8} {row['category']:<34} {row['op']}")


def main(argv=None) -> int:
  """Runs the benchmark; returns the process exit code (1 if the step recompiled)."""
  from ernie5_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "experiments" / "tiny.py"))
  parser.add_argument("--preset", default="", help="benchmarks/presets.py size: small, medium")
  parser.add_argument("--steps", type=int, default=50, help="Timed steps (compile included).")
  parser.add_argument("--breakdown", action="store_true", help="Also trace a per-op breakdown.")
  parser.add_argument("--breakdown_steps", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  from ernie5_jax import host_memory  # pylint: disable=g-import-not-at-top
  if argv is None:  # run as a command (not called in-process): as ernie5_jax.main runs
    host_memory.restart_with_tunable()
  if args.breakdown and TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TRACE_FLAG).strip()

  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from ernie5_jax.model import flops  # pylint: disable=g-import-not-at-top

  config = load_config(args.preset, args.config)
  runner = StepRunner(config, min(args.steps, 16), single_segment=bool(args.preset))
  compiles = []  # backend compiles of any function while stepping
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  first_s = runner.run(1)
  steady_steps = args.steps - 1
  usage = resource.getrusage(resource.RUSAGE_SELF)
  steady_s = runner.run(steady_steps)
  after = resource.getrusage(resource.RUSAGE_SELF)
  backend_compiles = len(compiles)
  per_step = lambda field: (getattr(after, field) - getattr(usage, field)) / steady_steps

  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  tokens_per_sec = steady_steps * tokens_per_step / steady_s
  flops_per_token = flops.train_flops_per_token(config)
  matmul_rate = matmul_flops_per_sec()
  mfu = tokens_per_sec * flops_per_token / matmul_rate
  params = flops.active_matmul_params(config.model)
  name = args.preset or pathlib.Path(args.config).name
  result = {
      "benchmark": "train_step",
      "config": name,
      "device": str(jax.devices()[0]), "platform": jax.default_backend(),
      "jax_version": jax.__version__,
      "global_batch_size": config.data.global_batch_size, "seq_len": config.data.seq_len,
      "steps": args.steps,
      "first_step_s (compile + run)": first_s,
      "step_ms": 1e3 * steady_s / steady_steps,
      # Host cost of a step: CPU time (user + system) and page faults that zero-fill fresh
      # memory (ernie5_jax/host_memory.py; what its settings change).
      "cpu_ms_per_step": 1e3 * (per_step("ru_utime") + per_step("ru_stime")),
      "system_ms_per_step": 1e3 * per_step("ru_stime"),
      "page_faults_per_step": per_step("ru_minflt"),
      "host_memory": host_memory.info(),
      "tokens_per_sec": tokens_per_sec,
      "total_params": runner.num_params,
      "active_matmul_params": params,
      "model_flops_per_token": flops_per_token,
      "model_flops_per_sec": tokens_per_sec * flops_per_token,
      "f32_matmul_flops_per_sec": matmul_rate,
      "mfu": mfu,
      "train_step_compiles": runner.compiles(),
      "backend_compiles_while_stepping": backend_compiles,
      "final_loss": float(runner.metrics["loss"]),
  }
  print(f"train step, {name} on {result['device']}: "
        f"{result['step_ms']:.2f} ms/step, {tokens_per_sec:,.0f} tokens/s")
  print(f"  model FLOPs {flops_per_token / 1e6:.2f} MFLOP/token -> "
        f"{result['model_flops_per_sec'] / 1e9:.2f} GFLOP/s; f32 matmul "
        f"{matmul_rate / 1e9:.1f} GFLOP/s; MFU {100 * mfu:.1f}%")
  print(f"  host: CPU {result['cpu_ms_per_step']:,.0f} ms/step (system "
        f"{result['system_ms_per_step']:,.0f}), {result['page_faults_per_step']:,.0f} page "
        f"faults/step; {result['host_memory']}")
  print(f"  first step {first_s:.1f} s (compile); train step compiled {runner.compiles()}x over "
        f"{args.steps} steps; total params {result['total_params']:,}, active matmul params "
        f"{sum(params.values()):,}")
  if args.breakdown:
    result["breakdown"] = breakdown(runner, args.breakdown_steps)
    print_breakdown(result["breakdown"])
  suffix = f"_{args.preset}" if args.preset else ""
  out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"train_step{suffix}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"  wrote {out}")
  if runner.compiles() != 1:
    print(f"ERROR: the train step compiled {runner.compiles()} times (expected 1)")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
