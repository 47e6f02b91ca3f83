"""The M2CP trainer: one linear function cut into labelled sections (as ernie5_jax/train/loop.py).

Shares the pre-training skeleton: the TrainState and its creation (train/state.py; params +
non-trainable rest: prototypes, prediction mean), the checkpoint writer (model / optimizer /
step / grain iterator state), clu writers and progress reporting, and train/metrics.py's
non-finite check and interval summary. Metrics are fetched every train.log_every steps and
before each checkpoint and eval; a non-finite loss or parameter stops the run before it is
saved (NonFiniteLossError).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx

from ernie5_jax import store
from ernie5_jax.m2cp import config as config_lib
from ernie5_jax.m2cp import data as data_lib
from ernie5_jax.m2cp import losses
from ernie5_jax.m2cp import metrics as metrics_lib
from ernie5_jax.m2cp.model import MODALITIES, M2CPModel
from ernie5_jax.train import checkpoint
from ernie5_jax.train import metrics as train_metrics
from ernie5_jax.train import state as state_lib
from ernie5_jax.train.state import TrainState

EVAL_FILE = "eval_metrics.json"  # <workdir>/eval_metrics.json: {step: metrics} of each eval.


def create_optimizer(config: ml_collections.ConfigDict):
  """config.optimizer's AdamW or SGD (momentum, L2 weight decay) on its schedule, after an
  optional global-norm clip; returns (tx, schedule)."""
  o = config.optimizer
  if o.schedule == "constant":
    schedule = optax.constant_schedule(o.learning_rate)
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, max(config.train.num_steps, o.warmup_steps + 1))
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  if o.name == "sgd":  # torch.optim.SGD: decay added to the gradient, then momentum.
    parts += [optax.add_decayed_weights(o.weight_decay),
              optax.sgd(schedule, momentum=o.momentum or None)]
  else:
    parts.append(optax.adamw(schedule, weight_decay=o.weight_decay))
  return optax.chain(*parts), schedule


def make_train_step(config, graphdef, tx, schedule, *, with_unlabelled: bool,
                    label_prior: np.ndarray):
  """Returns the jitted step (state, batch) -> (state, metrics); rows as data.TrainBatch.

  label_prior [C]: the labelled class marginal (distribution alignment, class balance).
  """
  num_classes = config.model.num_classes
  prior = jnp.asarray(label_prior, jnp.float32)  # [C]
  lo, bl, bu = config.loss, config.data.labelled_batch_size, config.data.unlabelled_batch_size
  # Rows the pseudo-label CE reads: the strongly augmented copies if present (FixMatch).
  strong = slice(bl + bu, bl + 2 * bu) if config.data.strong_unlabelled else slice(bl, bl + bu)

  def loss_fn(params, rest, batch, step):
    out = nnx.merge(graphdef, params, rest)(batch)
    y = batch["label"][:bl]  # [B_l]
    ce = {m: losses.cross_entropy(out[f"logits/{m}"][:bl], y) for m in (*MODALITIES, "fused")}
    total = lo.ce_weight * sum(ce[m] for m in MODALITIES) + lo.fused_ce_weight * ce["fused"]
    metrics = {f"ce/{m}": v for m, v in ce.items()}
    metrics["train_accuracy/fused"] = jnp.mean(jnp.argmax(out["logits/fused"][:bl], -1) == y)
    proto_args = None
    if with_unlabelled:
      proj = {m: out[f"proj/{m}"][bl:bl + bu] for m in MODALITIES}  # [B_u, proj]
      pairs = [(a, b) for i, a in enumerate(MODALITIES) for b in MODALITIES[i + 1:]]
      cons = jnp.mean(jnp.stack([losses.nt_xent(proj[a], proj[b], lo.consistency_temperature)
                                 for a, b in pairs]))
      running = rest["prediction_mean"].value  # [C]
      heads = ["fused", *MODALITIES] if lo.pseudo_label_source == "ensemble" else ["fused"]
      probs = losses.mean_softmax([out[f"logits/{h}"][bl:bl + bu] for h in heads])  # [B_u, C]
      if lo.distribution_alignment:
        pseudo_probs = losses.align_distribution(probs, prior, running)
      else:
        pseudo_probs = probs
      pseudo, confident = losses.confident_argmax(pseudo_probs, lo.pseudo_label_threshold)
      targets = jnp.concatenate([y, pseudo])  # [B]
      weights = jnp.concatenate([jnp.ones((bl,), jnp.float32), confident])  # [B]
      feats = [out[f"feat/{m}"][:bl + bu] for m in MODALITIES]  # [B_l + B_u, embed]
      m2cp = losses.m2cp_loss(feats, rest["prototypes"].value, targets, weights,
                              lo.m2cp_temperature)
      ramp = losses.rampup(step, lo.rampup_steps)
      pce = {m: losses.pseudo_label_ce(out[f"logits/{m}"][strong], pseudo, confident)
             for m in (*MODALITIES, "fused")}
      pseudo_ce = lo.ce_weight * sum(pce[m] for m in MODALITIES) + lo.fused_ce_weight * pce[
          "fused"]
      balance = jnp.mean(jnp.stack([
          losses.class_balance(out[f"logits/{m}"][bl:bl + bu], prior, running)
          for m in (*MODALITIES, "fused")]))
      total = (total + lo.consistency_weight * cons + lo.class_balance_weight * balance
               + ramp * (lo.m2cp_weight * m2cp + lo.pseudo_ce_weight * pseudo_ce))
      true_u = batch["label"][bl:bl + bu]  # Monitoring only: never enters a loss.
      metrics.update({
          "nt_xent": cons, "m2cp": m2cp, "m2cp_ramp": ramp, "pseudo/ce": pseudo_ce,
          "class_balance": balance,
          "pseudo/fraction": jnp.mean(confident),
          # num_classes x the largest class share of the moving-average prediction (1: even).
          "pseudo/max_class_share": num_classes * jnp.max(running),
          "pseudo/accuracy": jnp.sum((pseudo == true_u) * confident) / jnp.maximum(
              jnp.sum(confident), 1.0)})
      proto_args = ([jax.lax.stop_gradient(f) for f in feats], targets, weights, probs)
    metrics["loss"] = total
    return total, (metrics, proto_args)

  @jax.jit
  def train_step(state: TrainState, batch):
    grads, (metrics, proto_args) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.rest, batch, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = state.rest
    if proto_args is not None:
      model = nnx.merge(graphdef, params, rest)
      *proto_args, probs = proto_args
      model.prototypes.value = losses.update_prototypes(
          model.prototypes.value, *proto_args, lo.prototype_momentum)
      model.prediction_mean.value = losses.update_running_mean(
          model.prediction_mean.value, probs, lo.alignment_momentum)
      _, _, rest = nnx.split(model, nnx.Param, ...)
    metrics["learning_rate"] = schedule(state.step)
    metrics["params_finite"] = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return state.replace(step=state.step + 1, params=params, rest=rest,
                         opt_state=opt_state), metrics

  return train_step


def make_eval_fn(graphdef):
  """Jitted (params, rest, batch) -> {"feat/m", "logits/m", "logits/fused"}."""

  @jax.jit
  def eval_fn(params, rest, batch):
    out = nnx.merge(graphdef, params, rest)(batch)
    return {k: v for k, v in out.items() if not k.startswith("proj/")}

  return eval_fn


def evaluate(eval_fn, state: TrainState, test_batches, labels: np.ndarray) -> dict[str, float]:
  """Runs the test set; returns metrics_lib.evaluate's accuracy and mAP figures."""
  chunks = []
  for batch, valid in test_batches:
    out = jax.device_get(eval_fn(state.params, state.rest, batch))
    chunks.append({k: v[:valid] for k, v in out.items()})
  outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  return metrics_lib.evaluate(outputs, labels)


def _write_eval(workdir: str, step: int, result: dict[str, float]) -> None:
  path = os.path.join(workdir, EVAL_FILE)
  saved = {}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  saved[str(step)] = result
  with open(path, "w") as f:
    json.dump(saved, f, indent=1, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains config from the latest checkpoint in workdir (or from scratch) to train.num_steps."""
  config_lib.validate(config)
  t = config.train

  # --- logging -------------------------------------------------------------
  store.ensure_writable(workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  logging.info("workdir: %s\nconfig:\n%s", workdir, config)

  # --- input ---------------------------------------------------------------
  arrays = data_lib.load_arrays(config.data)
  train, test = arrays["train"], arrays["test"]
  labelled = data_lib.labelled_split(train["label"], config.data.label_fraction,
                                     config.data.split_seed)
  with_unlabelled = config_lib.uses_unlabelled(config)
  logging.info("%d train objects (%d labelled), %d test objects; unlabelled losses: %s",
               len(train["label"]), len(labelled), len(test["label"]), with_unlabelled)
  data_iter = data_lib.create_train_iterator(train, labelled, config,
                                             with_unlabelled=with_unlabelled)
  test_batches = data_lib.eval_batches(test, config.data)

  # --- model + optimizer + checkpoint ---------------------------------------
  tx, schedule = create_optimizer(config)
  view_size = train["views"].shape[-1]
  create = lambda: M2CPModel(config.model, view_size, rngs=nnx.Rngs(config.seed))
  graphdef, abstract = state_lib.abstract_train_state(create, tx)
  manager = checkpoint.create_manager(workdir, keep=t.keep_checkpoints,
                                      async_save=t.async_checkpoints)
  run = checkpoint.run_record(config)  # What each checkpoint records of this run.
  state = checkpoint.restore_or_init(manager, abstract, data_iter,
                                     lambda: state_lib.init_train_state(create, tx)[1],
                                     run=run)
  start_step = int(state.step)
  if start_step >= t.num_steps:
    logging.info("Nothing to do: the checkpoint at step %d already reached "
                 "config.train.num_steps=%d.", start_step, t.num_steps)
    manager.close()
    writer.close()
    return state
  if jax.process_index() == 0:  # Once the state fits config: jobs read the run's family.
    store.save_config(config, workdir)

  # --- step ----------------------------------------------------------------
  label_prior = np.bincount(train["label"][labelled], minlength=config.model.num_classes)
  train_step = make_train_step(config, graphdef, tx, schedule, with_unlabelled=with_unlabelled,
                               label_prior=label_prior / label_prior.sum())
  eval_fn = make_eval_fn(graphdef)

  # --- loop ----------------------------------------------------------------
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer,
                                           every_steps=t.log_every)
  unchecked, history = [], []
  interval_start, interval_steps = time.perf_counter(), 0
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      state, metrics = train_step(state, next(data_iter))
      unchecked.append((step, metrics))
      interval_steps += 1
      report(step)
      is_last = step == t.num_steps
      is_log = step % t.log_every == 0 or is_last
      is_save = step % t.checkpoint_every == 0 or is_last
      is_eval = step % t.eval_every == 0 or is_last
      if is_log or is_save or is_eval:
        fetched = jax.device_get(unchecked)
        train_metrics.check_finite(fetched, manager)
        history += fetched
        unchecked = []
      if is_log:
        summary = train_metrics.summarize(history)
        summary["perf/steps_per_sec"] = interval_steps / (time.perf_counter() - interval_start)
        writer.write_scalars(step, summary)
        history, interval_start, interval_steps = [], time.perf_counter(), 0
      if is_eval:
        with report.timed("eval"):
          result = evaluate(eval_fn, state, test_batches, test["label"])
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        if jax.process_index() == 0:
          _write_eval(workdir, step, result)
      if is_save:
        with report.timed("checkpoint", wait_jax_async_dispatch=False):
          checkpoint.save(manager, state, data_iter, run=run)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
  logging.info("Finished training at step %d; checkpoints in %s.", int(state.step),
               manager.directory)
  return state
