"""The trainer: one linear function, cut into labelled sections (after big_vision's train.py).

Metrics are fetched from the device only every train.log_every steps and before
every checkpoint; each fetch checks every step since the last one for a
non-finite loss, so a bad state is never saved and the error names the first
bad step (train/metrics.py: the check and the summary every trainer shares).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions

from ernie5_jax import input_pipeline
from ernie5_jax import sharding
from ernie5_jax import store
from ernie5_jax.input_pipeline import records
from ernie5_jax.model import create_model
from ernie5_jax.train import checkpoint, optimizer
from ernie5_jax.train import metrics as metrics_lib
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains config from the latest checkpoint in workdir (or from scratch) to train.num_steps."""
  input_pipeline.validate(config)  # Before anything is built or compiled.
  t = config.train

  if t.init_from:  # A wrong path fails now, before the data and the model are built.
    store.locate(t.init_from)
  # --- mesh (config.mesh; sharding.py): a mesh the devices cannot make fails here -------
  layout = sharding.make_layout(config)
  data_sharding = sharding.batch_sharding(layout, config.data.global_batch_size)

  # --- logging -------------------------------------------------------------
  store.ensure_writable(workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  logging.info("workdir: %s\nconfig:\n%s", workdir, config)
  logging.info("mesh: %s", layout.mesh)

  # --- input ---------------------------------------------------------------
  skips = records.SkipCounter(config.data.max_skip_fraction)  # data.skip_corrupt's count.
  data_iter = input_pipeline.create_train_iterator(config, skips=skips)
  tokens_per_step = config.data.global_batch_size * config.data.seq_len

  # --- model + optimizer ---------------------------------------------------
  tx, schedule = optimizer.create_optimizer(config)
  create = lambda: create_model(config)
  graphdef, abstract = state_lib.abstract_train_state(create, tx)
  # Every parameter, optimizer moment and RouterBias sharded by its logical axis names;
  # restoring into this target reshards a checkpoint written on any other mesh.
  state_sharding = sharding.tree_shardings(abstract, layout)
  abstract = sharding.with_shardings(abstract, state_sharding)

  # --- checkpoint (restore the latest, else initialise) -------------------
  manager = checkpoint.create_manager(workdir, keep=t.keep_checkpoints,
                                      async_save=t.async_checkpoints)
  if t.init_from:  # Fine-tuning: the start weights come from another run's checkpoint.
    init = lambda: checkpoint.init_from(config, tx, t.init_from, sharding=state_sharding)
  else:
    init = lambda: state_lib.init_train_state(create, tx, sharding=state_sharding)[1]
  run = checkpoint.run_record(config)
  state = checkpoint.restore_or_init(manager, abstract, data_iter, init, run=run)
  start_step = int(state.step)
  if start_step >= t.num_steps:
    logging.info("Nothing to do: the checkpoint at step %d already reached "
                 "config.train.num_steps=%d.", start_step, t.num_steps)
    manager.close()
    writer.close()
    return state
  # Only now, with the state restored or initialised against config and steps to train: a
  # resume that fails (another d_model, another data stream), or a rerun of a finished run,
  # leaves the run's config.json as it was.
  if jax.process_index() == 0:  # Eval/export jobs rebuild the model from it (restore_model).
    store.save_config(config, workdir)
  if start_step == 0:
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                          for k, v in _flatten(config.to_dict()).items()})

  # --- step ----------------------------------------------------------------
  # Traced under the layout: activation constraints and expert-parallel MoE dispatch.
  train_step = sharding.under_layout(step_lib.make_train_step(
      config, graphdef, tx, schedule,
      **sharding.step_shardings(layout, state_sharding, data_sharding)), layout)

  # --- loop ----------------------------------------------------------------
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer,
                                           every_steps=t.log_every)
  hooks = [report]
  if t.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=t.profile_steps,
                                          first_profile=start_step + 5))
  unchecked, history = [], []  # Device metrics not yet checked / not yet written.
  interval_start, interval_steps = time.perf_counter(), 0
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.to_global(next(data_iter), data_sharding)
        state, metrics = train_step(state, batch)
      unchecked.append((step, metrics))
      interval_steps += 1
      for hook in hooks:
        hook(step)

      is_log = step % t.log_every == 0 or step == t.num_steps
      is_save = step % t.checkpoint_every == 0 or step == t.num_steps
      if is_log or is_save:
        fetched = jax.device_get(unchecked)
        metrics_lib.check_finite(fetched, manager)
        history += fetched
        unchecked = []
      if is_log:
        elapsed = time.perf_counter() - interval_start
        summary = metrics_lib.summarize(history)
        summary["perf/tokens_per_sec"] = interval_steps * tokens_per_step / elapsed
        skipped = skips.interval()
        if skipped:  # Never silent: a skipped shard can remove a modality from training.
          logging.warning("Skipped unreadable records up to step %d (data.skip_corrupt): %s",
                          step, skipped)
          summary.update(skipped)
        writer.write_scalars(step, summary)
        history, interval_start, interval_steps = [], time.perf_counter(), 0
      if is_save:
        with report.timed("checkpoint", wait_jax_async_dispatch=False):
          checkpoint.save(manager, state, data_iter, run=run)
  except BaseException:
    # The error in flight is the one to report: a failing close (a full disk also stops the
    # TensorBoard writer) must not replace it.
    with contextlib.suppress(Exception):
      checkpoint.finish_writes(manager)
    with contextlib.suppress(Exception):
      writer.close()
    raise
  checkpoint.finish_writes(manager)  # Async saves finish (or fail in one line) first.
  writer.flush()
  writer.close()
  logging.info("Finished training at step %d; checkpoints in %s.", int(state.step),
               manager.directory)
  return state


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
