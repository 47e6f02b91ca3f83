"""The eval job: an elastic family report and a routing analysis of one checkpoint.

  python -m ernie5_jax.main --mode=eval --checkpoint=/tmp/tiny_mm --workdir=/tmp/tiny_mm_eval
  python -m ernie5_jax.main --mode=eval --checkpoint=/tmp/tiny_mm/checkpoints/300 \
      --workdir=OUT --config=experiments/tiny.py --config.eval.num_batches=8

The model and its config come from the checkpoint (train/checkpoint.py restore_model:
a workdir, its checkpoints/ dir, one step dir, or an exported sub-model); `--config.*`
overrides are applied on top of the stored config (main.py). Held-out data: the first
eval.num_batches batches of the data source's eval.split pipeline ("test" of
digits_multimodal / stdlib_text; the synthetic source has no split: it reads batches
far past any training run, see `held_out_batches`), the same batches for every
sub-model, so the report is deterministic up to float summation order.

For each sub-model of the family (model/elastic.py `family`): total parameters and
active parameters per token (`elastic_export.param_counts`), per-modality loss and top-1 accuracy of
the main head (teacher-forced CE over loss_mask, as training's loss/<modality>) under
`masks_for(config, sub)` (one compiled program for the whole family), and decode
tokens/s of the sub-model exported as a standalone model (`decode_tokens_per_sec`).
Under elastic.scheme "paper" the family is evaluated on the full model with each layer's
experts reordered by their load on these batches (elastic_export.permute_experts: the
same function), so a width-w member keeps the w experts of highest load, as its export.
The routing analysis (eval/routing.py) is of the full model.

Writes to the out dir:
  family_report.json   the table below, plus the checkpoint, split and token counts
  routing.json         eval/routing.py routing_analysis of the full model
  routing_*.png        its plots (eval/routing_plots.py), when eval.plots
  events.out.tfevents.*  all of it for TensorBoard at the checkpoint's step: scalars, the
                       table as text, the plots as images (eval/tensorboard.py)
and prints the family table. --watch (eval/watch.py) follows a training run instead.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax import elastic_export, input_pipeline
from ernie5_jax import store
from ernie5_jax.eval import routing as routing_lib
from ernie5_jax.eval import tensorboard
from ernie5_jax.model import elastic
from ernie5_jax.train import objective

MODALITIES = input_pipeline.MODALITIES
REPORT_FILE = "family_report.json"
ROUTING_FILE = "routing.json"
# The synthetic source has no held-out split: the eval job reads its batches from this
# index on (a training run reads batches 0, 1, ... one per step).
SYNTHETIC_EVAL_OFFSET = 1_000_000
_MODEL_FIELDS = ("tokens", "positions", "segment_ids", "group_ids", "audio_codes")


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of config whose data pipeline reads eval.split (single process)."""
  out = ml_collections.ConfigDict(config.to_dict())  # Deep, unlocked copy.
  out.data.split = config.eval.split
  return out


def held_out_batches(config: ml_collections.ConfigDict) -> list[dict[str, np.ndarray]]:
  """The first eval.num_batches batches [data.global_batch_size, seq] of the eval split."""
  cfg = eval_data_config(config)
  n = cfg.eval.num_batches
  ds = input_pipeline.create_dataset(cfg, process_index=0, process_count=1)
  if cfg.data.source == "synthetic":
    if cfg.train.num_steps > SYNTHETIC_EVAL_OFFSET:
      logging.warning("train.num_steps=%d > %d: the synthetic eval batches (from batch %d on) "
                      "were trained on.", cfg.train.num_steps, SYNTHETIC_EVAL_OFFSET,
                      SYNTHETIC_EVAL_OFFSET)
    return [ds[SYNTHETIC_EVAL_OFFSET + i] for i in range(n)]
  it = iter(ds) if isinstance(ds, grain.IterDataset) else iter(ds.to_iter_dataset())
  return [next(it) for _ in range(n)]


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: batch[k] for k in _MODEL_FIELDS if k in batch}


def make_loss_sums(model: nnx.Module):
  """Jitted (batch, masks) -> per-modality sums {loss, correct, tokens} [M] of one sub-model.

  masks are elastic.ElasticMasks; every sub-model of a family shares one compiled program.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def sums(state, batch, masks):
    m = nnx.merge(graphdef, state)
    hidden, _ = m.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                batch["group_ids"], batch.get("audio_codes"), elastic=masks)
    logits = m.logits(hidden)  # [batch, seq, vocab] float32
    ce, hit = objective.cross_entropy_and_hit(logits, batch["targets"])  # [batch, seq] each
    weight = batch["loss_mask"][..., None] * (
        batch["modality"][..., None] == jnp.arange(len(MODALITIES)))  # [batch, seq, M]
    return {"loss": jnp.einsum("bs,bsm->m", ce, weight),
            "correct": jnp.einsum("bs,bsm->m", hit, weight),
            "tokens": jnp.sum(weight, axis=(0, 1))}

  return lambda batch, masks: jax.device_get(sums(state, batch, masks))


def evaluate_submodel(loss_sums, batches: list[dict[str, np.ndarray]],
                      masks: elastic.ElasticMasks) -> dict[str, Any]:
  """Token-weighted per-modality loss / accuracy of one sub-model over all batches."""
  total = {k: np.zeros(len(MODALITIES)) for k in ("loss", "correct", "tokens")}
  for batch in batches:
    for k, v in loss_sums(batch, masks).items():
      total[k] += np.asarray(v, np.float64)
  present = [i for i, n in enumerate(total["tokens"]) if n > 0]
  tokens = total["tokens"]
  return {"loss": {MODALITIES[i]: float(total["loss"][i] / tokens[i]) for i in present},
          "accuracy": {MODALITIES[i]: float(total["correct"][i] / tokens[i]) for i in present},
          "tokens": {MODALITIES[i]: int(tokens[i]) for i in present},
          "loss_all": float(total["loss"].sum() / max(tokens.sum(), 1.0))}


def decode_tokens_per_second(config: ml_collections.ConfigDict, model: nnx.Module,
                             sub: elastic.SubModel) -> tuple[float | None, str]:
  """THE decode-speed hook: (generated tokens/s of `sub` exported standalone, how measured).

  The sub-model is cut out of the full model (elastic_export.export_submodel: only its
  layers and experts, its top-k) and timed by the generation module's greedy KV-cache
  decode (eval/samples.py decode_tokens_per_sec): eval.decode_batch_size rows,
  eval.decode_tokens new tokens after a data.seq_len // 4 prefill; compiles excluded.
  Returns (None, reason) when eval.decode_tokens is 0 or a piece is missing.
  """
  ev = config.eval
  if not ev.decode_tokens:
    return None, "not measured (eval.decode_tokens=0)"
  try:
    # pylint: disable-next=g-import-not-at-top
    from ernie5_jax.eval import samples  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"not measured: {e}"
  sub_config, sub_state = elastic_export.export_submodel(config, nnx.state(model), sub)
  sub_model = elastic_export.build_model(sub_config, sub_state)
  prompt_len = max(1, config.data.seq_len // 4)
  speed = samples.decode_tokens_per_sec(sub_config, sub_model, batch=ev.decode_batch_size,
                                             prompt_len=prompt_len,
                                             new_tokens=ev.decode_tokens)
  how = (f"greedy KV-cache decode of the exported sub-model, batch {ev.decode_batch_size}, "
         f"{ev.decode_tokens} new tokens after a {prompt_len}-token prefill, "
         f"{jax.default_backend()}")
  return float(speed), how


def analyse_routing(model: nnx.Module, config: ml_collections.ConfigDict,
                    batches: list[dict[str, np.ndarray]]) -> dict[str, Any] | None:
  """eval/routing.py's routing_analysis of the full model on batches; None without MoE layers.

  The routing is the model's own forward pass's (Decoder aux: expert_ids [L, batch, seq, K]
  and token_entropy [L, batch, seq]); tokens are flattened to [L, T] for the analysis.
  """
  if model.moe_layers is None:
    return None
  graphdef, state = nnx.split(model)

  @jax.jit
  def routing(state, batch):
    _, aux = nnx.merge(graphdef, state).hidden_states(**batch)
    return aux["expert_ids"], aux["token_entropy"]

  ids, entropy, modality, valid = [], [], [], []
  for batch in batches:
    expert_ids, token_entropy = jax.device_get(routing(state, _model_inputs(batch)))
    ids.append(expert_ids.reshape(expert_ids.shape[0], -1, expert_ids.shape[-1]))  # [L, T, K]
    entropy.append(token_entropy.reshape(token_entropy.shape[0], -1))  # [L, T]
    modality.append(np.asarray(batch["modality"]).reshape(-1))
    valid.append(np.asarray(batch["segment_ids"]).reshape(-1) > 0)
  return routing_lib.routing_analysis(
      np.concatenate(ids, axis=1), np.concatenate(entropy, axis=1), np.concatenate(modality),
      np.concatenate(valid), num_experts=config.model.num_experts, modalities=MODALITIES,
      fraction=config.eval.routing_top_fraction)


def format_table(rows: list[dict[str, Any]]) -> str:
  """The family report as a fixed-width text table (one line per sub-model)."""
  modalities = [m for m in MODALITIES if any(m in r["loss"] for r in rows)]
  head = (f"{'sub-model (depth,experts,top_k)':<32}{'total':>10}{'active/tok':>12}"
          + "".join(f"{'loss ' + m:>12}" for m in modalities)
          + "".join(f"{'acc ' + m:>11}" for m in modalities) + f"{'decode tok/s':>14}")
  lines = [head, "-" * len(head)]
  for r in rows:
    s = r["submodel"]
    name = f"{s['depth']},{s['experts']},{s['top_k']}" + (" (full)" if r["full"] else "")
    decode = r["decode_tokens_per_sec"]
    lines.append(
        f"{name:<32}{r['total_params']:>10,}{r['active_params_per_token']:>12,}"
        + "".join(f"{r['loss'][m]:>12.4f}" if m in r["loss"] else f"{'-':>12}"
                  for m in modalities)
        + "".join(f"{r['accuracy'][m]:>11.3f}" if m in r["accuracy"] else f"{'-':>11}"
                  for m in modalities)
        + (f"{decode:>14.1f}" if decode is not None else f"{'n/a':>14}"))
  return "\n".join(lines)


def run_eval(checkpoint_path: str, out_dir: str, *,
             config: ml_collections.ConfigDict | None = None,
             override_fields: tuple[str, ...] = (), step: int | None = None
             ) -> dict[str, Any]:
  """Restores checkpoint_path, writes the family report and routing analysis to out_dir.

  Args:
    checkpoint_path: anything store.locate accepts.
    out_dir: where the report files and the TensorBoard events go (created).
    config: the command line's --config: used whole only when the checkpoint has no stored
      config.json; otherwise only its `override_fields` replace the stored values.
    override_fields: dotted field paths set on the command line, e.g. ("eval.num_batches",).
    step: the step of a workdir to evaluate (default: the latest).
  Returns:
    The report dict written to family_report.json.
  """
  loc = store.locate(checkpoint_path, step)
  config = resolve_config(loc, config, override_fields)
  store.ensure_writable(out_dir)
  writer = metric_writers.create_default_writer(out_dir, asynchronous=False)
  try:
    return evaluate(loc, config, out_dir, writer)
  finally:
    writer.close()


def evaluate(loc: store.CheckpointLocation, config: ml_collections.ConfigDict, out_dir: str,
             writer: metric_writers.MetricWriter) -> dict[str, Any]:
  """The family report and routing analysis of the checkpoint at loc, under config.

  Writes routing.json and its plots, then the TensorBoard summaries (eval/tensorboard.py, at
  the checkpoint's step; 0 for an exported model), then family_report.json last: a report
  file on disk means the step was evaluated in full (what eval/watch.py resumes from).
  """
  start = time.perf_counter()
  config, model = store.restore_model(loc, config)
  os.makedirs(out_dir, exist_ok=True)

  batches = held_out_batches(config)
  family_model = model
  if config.elastic.scheme == "paper":  # Sub-models keep the experts of highest load.
    order = elastic_export.expert_order(elastic_export.measure_load(model, batches))
    family_model = elastic_export.build_model(
        config, elastic_export.permute_experts(config, nnx.state(model), order))
  loss_sums = make_loss_sums(family_model)
  full = elastic.full_submodel(config)
  rows = []
  for sub in elastic.family(config):
    t0 = time.perf_counter()
    metrics = evaluate_submodel(loss_sums, batches, elastic.masks_for(config, sub))
    counts = elastic_export.param_counts(config, sub)
    speed, how = decode_tokens_per_second(config, family_model, sub)
    rows.append({"submodel": {"depth": sub.depth, "experts": sub.experts, "top_k": sub.top_k},
                 "full": sub == full, "kept_layers": list(elastic.kept_layers(config, sub)),
                 "total_params": counts["total"],
                 "active_params_per_token": counts["active_per_token"], **metrics,
                 "decode_tokens_per_sec": speed, "seconds": time.perf_counter() - t0})
    logging.info("Evaluated sub-model %s in %.1f s.", sub, rows[-1]["seconds"])

  analysis = analyse_routing(model, config, batches)
  files, plots = [REPORT_FILE], []
  if analysis is not None:
    with open(os.path.join(out_dir, ROUTING_FILE), "w") as f:
      json.dump(analysis, f, indent=2)
    files.append(ROUTING_FILE)
    if config.eval.plots:
      from ernie5_jax.eval import routing_plots  # pylint: disable=g-import-not-at-top
      plots = routing_plots.plot_all(analysis, out_dir)
      files += plots

  table = format_table(rows)
  tensorboard.write_report(writer, loc.step or 0, rows, analysis,
                           [os.path.join(out_dir, p) for p in plots], table)
  report = {
      "checkpoint": str(loc.model_dir), "step": loc.step,
      "split": (config.eval.split if config.data.source != "synthetic" else
                f"none (synthetic: batches {SYNTHETIC_EVAL_OFFSET}.. of its stream)"),
      "data_source": config.data.source, "num_batches": config.eval.num_batches,
      "batch_shape": list(np.shape(batches[0]["tokens"])),
      "elastic_trained": bool(config.elastic.enabled), "backend": jax.default_backend(),
      "loss": "mean teacher-forced cross-entropy of the main head over loss_mask positions of "
              "each modality (training's loss/<modality>, before MTP / audio-level heads)",
      "decode": how, "submodels": rows, "routing_file": ROUTING_FILE if analysis else None,
      "files": files, "seconds": time.perf_counter() - start,
  }
  tmp = os.path.join(out_dir, f".{REPORT_FILE}.tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, REPORT_FILE))  # Atomic: the step's record.
  print(f"elastic family of {loc.model_dir} (step {loc.step}), {config.eval.num_batches} "
        f"batches of split {report['split']!r}:\n{table}")
  if analysis is not None:
    means = {pair: v["mean"] for pair, v in analysis["top_expert_iou"].items()}
    print("top-{:.0%} expert IoU between modalities (mean over layers): {}".format(
        analysis["top_fraction"], ", ".join(f"{k} {v:.2f}" for k, v in means.items()
                                            if v is not None) or "n/a"))
  print(f"wrote {', '.join(files)} to {out_dir}", flush=True)
  return report


def resolve_config(loc: store.CheckpointLocation,
                   config: ml_collections.ConfigDict | None,
                   override_fields: tuple[str, ...]) -> ml_collections.ConfigDict:
  """store.resolve_config, for LM checkpoints only (the eval job's families)."""
  config = store.resolve_config(loc, config, override_fields)
  if config.get("trainer", "lm") != "lm":
    raise config_lib.ConfigError(f"config.trainer={config.trainer!r} is not accepted by the "
                                 "eval job: expected an LM checkpoint ('lm')")
  return config
