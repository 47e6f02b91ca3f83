"""Benchmark: forward+backward time of each elastic sub-model, and the elastic step's compiles.

For every member of the family (model/elastic.py `family`) of an experiment config it
times one forward+backward pass (gradients of the objective, no optimizer) on one
staged batch, two ways:
- masked: the full model's parameters under `elastic=masks_for(sub)`, the program
  elastic training runs (one compile serves every sub-model: lax.cond skips layers,
  lax.switch picks the top-k; masked experts stay in the dispatch layout);
- exported: the standalone sub-model of elastic_export.export_submodel (its own
  compile), what a deployment of that sub-model runs.
Each time is divided by the full model's and compared with the ratio of active model
FLOPs (benchmarks/train_step.py: 6 * active matmul params + attention, per token):
time_ratio / flops_ratio = 1 means the time falls exactly with the FLOPs.
Then the elastic train step (the full model, then sampled sub-models, on the same batch)
runs --steps steps with different draws; it must compile exactly once. Beside it runs the
step whose sampled pass is the full model again, what the earlier unconditioned draw ran
with probability prod(full_*_prob) (0.48 at the defaults): the saving of never drawing the
full model is that probability times (duplicate step - elastic step), per step on average.

  nice -n 10 python benchmarks/elastic_step.py            # experiments/tiny.py:synthetic
  python benchmarks/elastic_step.py --iters 20 --steps 30

Prints the table and writes benchmarks/results/elastic_step.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.common import write_json  # noqa: E402
from ernie5_jax import distributed  # noqa: E402
from ernie5_jax import config as config_lib  # noqa: E402
from ernie5_jax import elastic_export  # noqa: E402
from ernie5_jax import input_pipeline  # noqa: E402
from ernie5_jax.model import create_model, elastic  # noqa: E402
from ernie5_jax.model.flops import train_flops_per_token  # noqa: E402
from ernie5_jax.train import optimizer  # noqa: E402
from ernie5_jax.train import state as state_lib  # noqa: E402
from ernie5_jax.train import step as step_lib  # noqa: E402


def grad_fn(graphdef: nnx.GraphDef, config, with_masks: bool):
  """jit(params, rest, batch[, masks]) -> grads of the objective (forward + backward)."""
  def fn(params, rest, batch, masks=None):
    grads, _ = jax.grad(step_lib.loss_and_metrics, has_aux=True)(
        params, rest, batch, graphdef=graphdef, config=config, elastic=masks)
    return grads
  return jax.jit(fn) if with_masks else jax.jit(lambda p, r, b: fn(p, r, b))


def main(argv=None) -> int:
  """Runs the benchmark; returns the process exit code (1 if the elastic step recompiled)."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "experiments" / "tiny.py") + ":synthetic")
  parser.add_argument("--iters", type=int, default=10,
                      help="Timed rounds (one call of each sub-model, masked and exported).")
  parser.add_argument("--steps", type=int, default=20, help="Elastic train steps run.")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  path, _, arg = args.config.partition(":")
  get_config = runpy.run_path(path)["get_config"]
  config = get_config(arg) if arg else get_config()
  config.elastic.enabled = True
  config_lib.validate(config)
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, state = state_lib.init_train_state(lambda: create_model(config), tx)
  data = input_pipeline.create_train_iterator(config)
  batches = [jax.device_put(next(data)) for _ in range(args.steps)]
  batch = batches[0]
  tokens = config.data.global_batch_size * config.data.seq_len

  # --- per sub-model forward + backward (all compiled first, then timed in rounds) -----
  masked = grad_fn(graphdef, config, with_masks=True)
  model_state = state.model_state()
  calls, rows = [], []
  for sub in elastic.family(config):
    sub_config, sub_state = elastic_export.export_submodel(config, model_state, sub)
    sub_graphdef = nnx.graphdef(elastic_export.abstract_model(sub_config))
    sub_params, sub_rest = sub_state.split(nnx.Param, ...)
    calls.append({
        "masked": (masked, (state.params, state.rest, batch, elastic.masks_for(config, sub))),
        "exported": (grad_fn(sub_graphdef, sub_config, with_masks=False),
                     (sub_params, sub_rest, batch))})
    counts = elastic_export.param_counts(config, sub)
    rows.append({"submodel": str(sub), "depth": sub.depth, "experts": sub.experts,
                 "top_k": sub.top_k, "total_params": counts["total"],
                 "active_params_per_token": counts["active_per_token"],
                 "model_flops": train_flops_per_token(sub_config) * tokens})
  for call in calls:  # Compile everything before timing.
    for fn, fn_args in call.values():
      jax.block_until_ready(fn(*fn_args))
  times = [{kind: [] for kind in c} for c in calls]
  for _ in range(args.iters):  # Rounds over every sub-model: load changes hit all alike.
    for call, timing in zip(calls, times):
      for kind, (fn, fn_args) in call.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        timing[kind].append(1e3 * (time.perf_counter() - start))
  for row, timing in zip(rows, times):
    for kind, values in timing.items():
      row[f"{kind}_ms"] = float(np.median(values))
  full = rows[0]
  for row in rows:
    row["flops_ratio"] = row["model_flops"] / full["model_flops"]
    for kind in ("masked", "exported"):
      row[f"{kind}_time_ratio"] = row[f"{kind}_ms"] / full[f"{kind}_ms"]
      row[f"{kind}_time_per_flops_ratio"] = row[f"{kind}_time_ratio"] / row["flops_ratio"]
  masked_compiles = masked._cache_size()  # pylint: disable=protected-access

  # --- the elastic train step vs the plain one: one compile over steps with new draws ---
  plain_config = config_lib.from_json(config_lib.to_json(config))
  plain_config.elastic.enabled = False
  _, plain_state = state_lib.init_train_state(lambda: create_model(plain_config), tx)
  fns = {"elastic": step_lib.make_train_step(config, graphdef, tx, schedule),
         "plain": step_lib.make_train_step(plain_config, graphdef, tx, schedule),
         "duplicate": step_lib.make_train_step(config, graphdef, tx, schedule)}
  states = {"elastic": state, "plain": plain_state, "duplicate": jax.tree.map(jnp.copy, state)}
  first_s = {}
  sample_masks = step_lib.step_masks
  for name, fn in fns.items():
    if name == "duplicate":  # Traced with every pass the full model (the old draw's 48%).
      step_lib.step_masks = lambda c, s: jax.tree.map(
          lambda v: jnp.broadcast_to(v, (1 + c.elastic.sub_models,) + v.shape),
          elastic.masks_for(c, elastic.full_submodel(c)))
    try:
      start = time.perf_counter()
      states[name], metrics = fn(states[name], batches[0])
      jax.block_until_ready(metrics)
      first_s[name] = time.perf_counter() - start
    finally:
      step_lib.step_masks = sample_masks
  draw = jax.jit(lambda s: step_lib.step_masks(config, s))
  jax.block_until_ready(draw(states["elastic"].step))  # compiled before counting
  sampled, step_ms, losses = set(), {name: [] for name in fns}, {}
  compiles = []

  def listener(event, _, **unused):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for b in batches[1:]:
      masks = jax.device_get(draw(states["elastic"].step))
      sampled.add(str(elastic.SubModel(  # On the host: no jnp op (and compile) here.
          int(masks.layer_keep[1].sum()), int(masks.expert_mask[1].sum()),
          masks.top_ks[int(masks.top_k_index[1])])))
      for name, fn in fns.items():  # Alternating, so that load changes hit both alike.
        start = time.perf_counter()
        states[name], metrics = fn(states[name], b)
        losses[name] = jax.block_until_ready(metrics["loss"])
        step_ms[name].append(1e3 * (time.perf_counter() - start))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  backend_compiles = len(compiles)
  step_compiles = fns["elastic"]._cache_size()  # pylint: disable=protected-access

  el = config.elastic
  p_full = (el.full_depth_prob * el.full_experts_prob * el.full_top_k_prob) ** el.sub_models
  new_ms, dup_ms = float(np.mean(step_ms["elastic"])), float(np.mean(step_ms["duplicate"]))
  old_ms = p_full * dup_ms + (1 - p_full) * new_ms  # The unconditioned draw, expected.
  saving = {"p_full_unconditioned": p_full, "elastic_step_ms (mean)": new_ms,
            "duplicate_step_ms (mean)": dup_ms, "unconditioned_step_ms (expected)": old_ms,
            "saving_fraction": (old_ms - new_ms) / old_ms}
  result = {
      "benchmark": "elastic_step", "config": os.path.relpath(args.config, ROOT),
      "device": str(jax.devices()[0]), "platform": jax.default_backend(),
      "jax_version": jax.__version__, "load_average": os.getloadavg(),
      "global_batch_size": config.data.global_batch_size, "seq_len": config.data.seq_len,
      "iters": args.iters, "submodels": rows,
      "masked_forward_backward_compiles": masked_compiles,
      "elastic_step": {"steps": args.steps, "sub_models": config.elastic.sub_models,
                       "first_step_s (compile + run)": first_s["elastic"],
                       "step_ms (median)": float(np.median(step_ms["elastic"])),
                       "sampled_submodels": sorted(sampled),
                       "train_step_compiles": step_compiles,
                       "backend_compiles_after_warmup": backend_compiles,
                       "final_loss": float(losses["elastic"])},
      "duplicate_full_step": {"step_ms (mean)": float(np.mean(step_ms["duplicate"]))},
      "conditioned_draw_saving": saving,
      "plain_step": {"first_step_s (compile + run)": first_s["plain"],
                     "step_ms (median)": float(np.median(step_ms["plain"])),
                     "final_loss": float(losses["plain"])},
  }
  print(f"elastic family of {args.config} on {result['device']} "
        f"(batch {config.data.global_batch_size} x {config.data.seq_len}), forward+backward:")
  print(f"  {'sub-model':34s} {'params':>8s} {'active':>8s} {'FLOPs':>6s} "
        f"{'masked ms':>10s} {'ratio':>6s} {'/FLOPs':>6s} {'export ms':>10s} {'ratio':>6s} "
        f"{'/FLOPs':>6s}")
  for r in rows:
    print(f"  {r['submodel']:34s} {r['total_params']:8,d} {r['active_params_per_token']:8,d} "
          f"{r['flops_ratio']:6.2f} {r['masked_ms']:10.2f} {r['masked_time_ratio']:6.2f} "
          f"{r['masked_time_per_flops_ratio']:6.2f} {r['exported_ms']:10.2f} "
          f"{r['exported_time_ratio']:6.2f} {r['exported_time_per_flops_ratio']:6.2f}")
  print(f"  masked forward+backward compiled {masked_compiles}x for {len(rows)} sub-models")
  e, p = result["elastic_step"], result["plain_step"]
  print(f"elastic train step: first {e['first_step_s (compile + run)']:.1f} s (compile), then "
        f"{e['step_ms (median)']:.1f} ms/step (median); compiled {step_compiles}x over "
        f"{args.steps} steps drawing {len(sampled)} distinct sub-models; {backend_compiles} "
        f"backend compiles after warm-up")
  print(f"plain train step (elastic off): first {p['first_step_s (compile + run)']:.1f} s, then "
        f"{p['step_ms (median)']:.1f} ms/step (median)")
  print(f"never drawing the full model: elastic step {new_ms:.1f} ms (mean) vs duplicate "
        f"full pass {dup_ms:.1f} ms; the unconditioned draw (full with p={p_full:.2f}) "
        f"would average {old_ms:.1f} ms: {100 * saving['saving_fraction']:.1f}% saved")
  write_json(result, "elastic_step", args.out)
  if step_compiles != 1 or backend_compiles or masked_compiles != 1:
    print("ERROR: the elastic step or the masked forward+backward recompiled")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
