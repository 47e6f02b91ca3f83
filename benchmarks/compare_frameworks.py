"""Side by side: ernie5_jax vs `transformers`' Ernie4_5_MoeForCausalLM, train step and decode.

The same text-only MoE model (benchmarks/presets.py) in both frameworks: the driver
initialises it in JAX, exports the weights as a Hugging Face checkpoint
(interop/ernie45.py) and checks that transformers' logits on a batch match JAX's (and
that both route every token to the same experts would follow from that: the logits of a
mis-routed token differ). Then one worker process per contender -- this checkout's JAX
(and optionally other checkouts holding this script, --jax_root=NAME=PATH, e.g. a
baseline commit), torch
eager, torch.compile -- is given the same work in alternating rounds, so load from other
processes on a shared machine falls on all of them alike. With --alone, one worker process
runs at a time instead (each does all its rounds, then exits): on this project's 2-core VM
ernie5_jax's medium step ran 4.8-5.9 s in most rounds while a torch worker trained between
its rounds, 4.2 s with no other worker (docs/results.md), so both protocols are reported:

- decode: greedy generation of --decode_tokens tokens after a 16-token prompt, batch 1
  and 8, prefill included (JAX: generate/decode.py's KV-cache steps; torch: generate with
  a static KV cache), compiles excluded (a warm-up generation first);
- train: --train_steps optimizer steps per round on the same token batches (one document
  per row, float32, forward + backward + global-norm clip 1.0 + AdamW); the first steps
  (compile) are timed separately.

Every worker of this checkout, torch's included, runs with ernie5_jax/host_memory.py's
heap thresholds (freed buffers stay in the heap); the ernie5_jax workers also with its glibc
tunable, as ernie5_jax.main runs. ERNIE5_JAX_SYSTEM_MALLOC=1 runs them all with glibc's
defaults instead.

tokens/s are medians over the rounds; MFU is against each framework's own best f32
[1024, 1024] matmul rate measured in the same run (model FLOPs: model/flops.py).

  /work/side-venv/bin/python -c 'import torch, transformers'   # the side environment
  python benchmarks/compare_frameworks.py --preset=small --side_python=/work/side-venv/bin/python
  python benchmarks/compare_frameworks.py --preset=medium --rounds=3 --train_steps=2

Writes benchmarks/results/compare_frameworks_<preset>[_alone][_system_malloc].json and prints
a markdown table (--skip_train: decode only, as benchmarks/decode_speed.py --preset runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (its own package)

from benchmarks import worker_protocol  # noqa: E402  pylint: disable=wrong-import-position

PROMPT_LEN = 16
PROMPT_ROWS = 8


# --- the JAX worker -------------------------------------------------------------------------

class JaxWorker:
  """The jitted train step and KV-cache decoder of one preset (same protocol as the torch one)."""

  def __init__(self, preset: str, prompts_path: str):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from benchmarks import train_step  # pylint: disable=g-import-not-at-top
    from ernie5_jax.generate.decode import CachedDecoder  # pylint: disable=g-import-not-at-top
    self.runner = train_step.StepRunner(train_step.load_config(preset, ""), 4,
                                        single_segment=True)
    # Decode runs the initial weights (the driver runs the decode rounds before training).
    model = nnx.merge(self.runner.graphdef, self.runner.state.params, self.runner.state.rest)
    self.decoder = CachedDecoder(model)
    self.prompts = np.load(prompts_path)["prompts"]  # [rows, prompt_len]

  def train(self, steps: int) -> float:
    """Seconds of `steps` train steps."""
    return self.runner.run(steps)

  def decode(self, rows: int, new_tokens: int) -> float:
    """Seconds of a greedy generation of new_tokens after `rows` prompts, prefill included."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from ernie5_jax.generate.decode import StepInputs  # pylint: disable=g-import-not-at-top
    from ernie5_jax.generate.sampling import GREEDY  # pylint: disable=g-import-not-at-top
    dec, prompt_len = self.decoder, self.prompts.shape[1]
    index = jnp.arange(prompt_len, dtype=jnp.int32)
    prompt = StepInputs(
        tokens=jnp.asarray(self.prompts[:rows], jnp.int32),
        positions=jnp.broadcast_to(index[None, :, None], (rows, prompt_len, 3)),
        segment_ids=jnp.ones((rows, prompt_len), jnp.int32),
        group_ids=jnp.zeros((rows, prompt_len), jnp.int32),
        audio_codes=jnp.full((rows, prompt_len, dec.audio_levels), -1, jnp.int32))
    key = jax.random.key(0)
    positions = [jnp.full((rows,), prompt_len + i, jnp.int32) for i in range(new_tokens)]
    start = time.perf_counter()
    cache = dec.init_cache(batch=rows, max_len=prompt_len + new_tokens)
    out, cache = dec.step(cache, prompt, key, GREEDY)  # prefill: the first new token
    token = out.tokens[:, -1]
    for i in range(new_tokens - 1):
      token, cache = dec.text_step(cache, token, positions[i], key)
    token.block_until_ready()
    return time.perf_counter() - start

  def matmul(self) -> float:
    """Best f32 [1024, 1024] matmul rate of three measurements, FLOP/s."""
    from benchmarks.train_step import matmul_flops_per_sec  # pylint: disable=g-import-not-at-top
    return max(matmul_flops_per_sec() for _ in range(3))

  def logits(self, path_in: str, path_out: str) -> None:
    """Writes the float32 logits of PATH_IN's tokens (one document per row) to PATH_OUT."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    tokens = np.load(path_in)["tokens"]
    np.savez(path_out, logits=np.asarray(jax_logits(self.runner, tokens)))


def jax_logits(runner, tokens):
  """[batch, seq, vocab] float32 logits of the runner's current weights, one document per row."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.merge(runner.graphdef, runner.state.params, runner.state.rest)
  rows, seq = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :, None], (rows, seq, 3))
  ones = jnp.ones((rows, seq), jnp.int32)
  hidden, _ = model.hidden_states(jnp.asarray(tokens), pos, ones, 0 * ones, None)
  return model.logits(hidden)


# --- the driver -----------------------------------------------------------------------------

# host_memory.info() keys each worker reports, recorded per contender.
HOST_SETTINGS = ("host_malloc", "malloc_tunables")

class Contender:
  """A worker subprocess spoken to one line at a time (benchmarks/worker_protocol.py)."""

  def __init__(self, name: str, argv: list[str]):
    self.name = name
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, cwd=str(ROOT))
    self.info = self._read()

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
      if line.startswith("{"):
        return json.loads(line)

  def ask(self, command: str) -> dict:
    """Sends one command; returns the reply."""
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    if "error" in reply:
      raise RuntimeError(f"worker {self.name}: {reply['error']}")
    return reply

  def close(self) -> None:
    """Asks the worker to quit."""
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def stage(preset: str, out_dir: pathlib.Path) -> tuple:
  """Exports the preset's initial JAX weights as HF, writes the batches; returns them too."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from ernie5_jax.interop import ernie45  # pylint: disable=g-import-not-at-top
  config = train_step.load_config(preset, "")
  runner = train_step.StepRunner(config, 4, single_segment=True)
  model_state = nnx.state(nnx.merge(runner.graphdef, runner.state.params, runner.state.rest))
  ernie45.export_hf(config, model_state, str(out_dir / "hf"))
  tokens = np.stack([np.asarray(b["tokens"]) for b in runner.batches])  # [n, batch, seq]
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, config.model.vocab_size, (PROMPT_ROWS, PROMPT_LEN)).astype(np.int32)
  np.savez(out_dir / "batches.npz", tokens=tokens, prompts=prompts)
  np.savez(out_dir / "probe.npz", tokens=tokens[0])
  logits = np.asarray(jax_logits(runner, tokens[0]))
  return config, logits


def _has_torch(python: str) -> bool:
  """Whether `python` runs and imports torch and transformers."""
  try:
    return subprocess.run([python, "-c", "import torch, transformers"], capture_output=True,
                          check=False).returncode == 0
  except OSError:
    return False


@dataclasses.dataclass
class Tally:
  """What the rounds measured, by contender name."""
  rates: dict = dataclasses.field(default_factory=dict)  # best f32 matmul FLOP/s
  decode: dict = dataclasses.field(default_factory=dict)  # ("batch_B", B) -> name -> [s]
  first: dict = dataclasses.field(default_factory=dict)  # seconds of the first 2 train steps
  times: dict = dataclasses.field(default_factory=dict)  # seconds of each train round


def _measure(contenders, args, work, jax_probe, result: dict, tally: Tally) -> None:
  """Logit check, matmul rates, decode and train rounds of resident `contenders`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch_workers = [c for c in contenders if c.name.startswith("torch")]
  if torch_workers and "max_abs_logit_diff" not in result:
    # The same function: transformers' logits on the probe batch vs JAX's.
    torch_workers[0].ask(f"logits {work / 'probe.npz'} {work / 'torch_logits.npz'}")
    torch_probe = np.load(work / "torch_logits.npz")["logits"]
    result["max_abs_logit_diff"] = float(np.max(np.abs(torch_probe - jax_probe)))
    result["max_abs_logit"] = float(np.max(np.abs(jax_probe)))
    print(f"logits, transformers vs JAX: max |diff| {result['max_abs_logit_diff']:.2e} "
          f"(max |logit| {result['max_abs_logit']:.2f})")
  tally.rates.update({c.name: c.ask("matmul")["flops_per_sec"] for c in contenders})
  if not args.skip_decode:
    for rows in (int(b) for b in args.decode_batches.split(",")):
      per_name = tally.decode.setdefault((f"batch_{rows}", rows), {})
      for c in contenders:  # warm-up: compiles
        c.ask(f"decode {rows} {args.decode_tokens}")
        per_name[c.name] = []
      for _ in range(args.rounds):
        for c in contenders:
          per_name[c.name].append(c.ask(f"decode {rows} {args.decode_tokens}")["seconds"])
  if not args.skip_train:
    tally.first.update({c.name: c.ask("train 2")["seconds"] for c in contenders})  # compiles
    tally.times.update({c.name: [] for c in contenders})
    for _ in range(args.rounds):
      for c in contenders:
        tally.times[c.name].append(c.ask(f"train {args.train_steps}")["seconds"])
    for c in contenders:
      tally.rates[c.name] = max(tally.rates[c.name], c.ask("matmul")["flops_per_sec"])


def main(argv: list[str] | None = None) -> int:
  """Runs the comparison (module docstring); returns the exit code."""
  from ernie5_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--side_python", default="/work/side-venv/bin/python",
                      help="python of the side environment with torch + transformers")
  parser.add_argument("--jax_root", action="append", default=[],
                      help="NAME=PATH: also run the JAX worker of another checkout")
  parser.add_argument("--torch", default="eager,compile", help="torch modes to run")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--train_steps", type=int, default=3, help="steps per contender per round")
  parser.add_argument("--decode_tokens", type=int, default=32)
  parser.add_argument("--decode_batches", default="1,8")
  parser.add_argument("--skip_decode", action="store_true")
  parser.add_argument("--skip_train", action="store_true")
  parser.add_argument("--alone", action="store_true",
                      help="one worker process at a time (each runs all its rounds), instead "
                           "of every worker resident with rounds interleaved")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--prompts", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.worker:
    from ernie5_jax import host_memory  # pylint: disable=g-import-not-at-top
    if argv is None:  # run as a command (not called in-process): as ernie5_jax.main runs
      host_memory.restart_with_tunable()
    worker_protocol.serve(JaxWorker(args.preset, args.prompts), **host_memory.info())
    return 0

  from ernie5_jax.model import flops  # pylint: disable=g-import-not-at-top
  modes = [m for m in args.torch.split(",") if m]
  if modes and not _has_torch(args.side_python):
    print(f"error: --side_python={args.side_python} cannot import torch and transformers: "
          "point it at a side environment that has both, or pass --torch= to skip them")
    return 2
  work = pathlib.Path(tempfile.mkdtemp(prefix="compare_frameworks_"))
  config, jax_probe = stage(args.preset, work)
  worker = lambda root: [sys.executable, str(root / "benchmarks" / "compare_frameworks.py"),
                         "--worker", f"--preset={args.preset}", f"--prompts={work / 'batches.npz'}"]
  specs = [("ernie5_jax", worker(ROOT))]
  for spec in args.jax_root:  # another checkout's package, driven by its copy of this script
    name, path = spec.split("=", 1)
    specs.append((name, worker(pathlib.Path(path).resolve())))
  for mode in modes:
    specs.append((f"torch {mode}",
                  [args.side_python, str(ROOT / "benchmarks" / "torch_reference.py"),
                   f"--hf_dir={work / 'hf'}", f"--batches={work / 'batches.npz'}",
                   f"--mode={mode}"]))
  result = {"benchmark": "compare_frameworks", "preset": args.preset,
            "model": {k: config.model[k] for k in ("d_model", "num_layers", "num_dense_layers",
                                                   "num_heads", "num_kv_heads", "head_dim",
                                                   "dense_hidden", "num_experts", "expert_hidden",
                                                   "top_k", "num_shared_experts", "vocab_size")},
            "batch": config.data.global_batch_size, "seq_len": config.data.seq_len,
            "rounds": args.rounds, "train_steps_per_round": args.train_steps,
            "protocol": "alone" if args.alone else "alternating",
            "contenders": [name for name, _ in specs],
            **{setting: {} for setting in HOST_SETTINGS}}
  # Alternating: every worker resident, rounds interleaved. Alone: one worker at a time.
  groups = [[spec] for spec in specs] if args.alone else [specs]
  tally = Tally()
  for group in groups:
    contenders = [Contender(name, argv) for name, argv in group]
    try:
      for c in contenders:
        for setting in HOST_SETTINGS:  # None: a checkout without it
          result[setting][c.name] = c.info.get(setting)
        if c.name.startswith("torch"):
          result.setdefault("torch", c.info)
      _measure(contenders, args, work, jax_probe, result, tally)
    finally:
      for c in contenders:
        c.close()
  if tally.decode:
    result["decode"] = {key: {name: {"tokens_per_sec": rows * args.decode_tokens /
                                     statistics.median(t), "seconds": t}
                              for name, t in per_name.items()}
                        for (key, rows), per_name in tally.decode.items()}
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(config)
  result["train"] = {}
  for name, t in tally.times.items():
    tps = args.train_steps * tokens_per_step / statistics.median(t)
    rate = tally.rates[name]
    result["train"][name] = {"tokens_per_sec": tps,
                             "ms_per_step": 1e3 * statistics.median(t) / args.train_steps,
                             "first_2_steps_s": tally.first[name], "matmul_flops_per_sec": rate,
                             "mfu": tps * flops_per_token / rate, "seconds": t}
  report(result)
  from ernie5_jax import host_memory  # pylint: disable=g-import-not-at-top
  stem = (f"compare_frameworks_{args.preset}" + ("_alone" if args.alone else "")
          + ("" if host_memory.keep_freed_memory() else "_system_malloc")
          + ("_decode" if args.skip_train else ""))
  out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"{stem}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


def report(result: dict) -> None:
  """Prints the train and decode tables (markdown)."""
  names = result["contenders"]
  train = result["train"]
  for key, rows in result.get("decode", {}).items():
    print(f"decode {key}: " + ", ".join(f"{n} {rows[n]['tokens_per_sec']:,.0f} tok/s"
                                        for n in names))
  if not train:
    return
  print(f"\ntrain step, preset {result['preset']} (batch {result['batch']} x seq "
        f"{result['seq_len']}, median of {result['rounds']} rounds):")
  print("| | " + " | ".join(names) + " |")
  print("|---|" + "---|" * len(names))
  print("| tokens/s | " + " | ".join(f"{train[n]['tokens_per_sec']:,.0f}" for n in names) + " |")
  print("| ms/step | " + " | ".join(f"{train[n]['ms_per_step']:,.0f}" for n in names) + " |")
  print("| MFU (own matmul rate) | " + " | ".join(f"{100 * train[n]['mfu']:.0f}%"
                                               for n in names) + " |")
  print("| first 2 steps (compile) s | " + " | ".join(f"{train[n]['first_2_steps_s']:.1f}"
                                                     for n in names) + " |")
  for name in names[1:]:
    ratio = train[names[0]]["tokens_per_sec"] / train[name]["tokens_per_sec"]
    print(f"ernie5_jax / {name}: {ratio:.2f}x")


if __name__ == "__main__":
  sys.exit(main())
