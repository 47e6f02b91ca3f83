"""Orbax checkpoints of the train state plus the grain iterator state.

The one writer of training checkpoints (pre-training, M2CP, RL). Layout:
`<workdir>/checkpoints/<step>/` with the items
  model      StandardSave  nnx.State of the decoder (params + RouterBias, ...)
  optimizer  StandardSave  optax state
  step       JsonSave      {"step": optimizer steps, "checkpoint": <step>}
  data       grain         this process's iterator state (process_<i>-of-<n>.json)
  <name>     JsonSave      a trainer's host state (json_items; RL's "rl")
so an eval job can restore just "model", and a killed run resumes on exactly the
batch it would have read next. The trainer also writes the resolved config to
`<workdir>/config.json` (store.save_config), so that any job restores the model from a
path alone (ernie5_jax/store.py).
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ernie5_jax import store
from ernie5_jax.store import CheckpointMismatchError
from ernie5_jax.train.state import TrainState, new_train_state, num_params


def create_manager(workdir: str, *, keep: int, async_save: bool, data: bool = True,
                   json_items: tuple[str, ...] = ()) -> ocp.CheckpointManager:
  """Returns a CheckpointManager on <workdir>/checkpoints keeping the last `keep` steps.

  Its items: model, optimizer, step, then "data" (the grain iterator state; data=False for
  a loop that reads no iterator) and one JSON item per name in json_items (a trainer's host
  state, e.g. RL's "rl"): what `save` writes.
  """
  handlers = {"model": ocp.StandardCheckpointHandler(),
              "optimizer": ocp.StandardCheckpointHandler(),
              "step": ocp.JsonCheckpointHandler()}
  if data:
    handlers["data"] = grain.checkpoint.CheckpointHandler()
  handlers.update({name: ocp.JsonCheckpointHandler() for name in json_items})
  # cleanup_tmp_directories: drop the half-written step of a killed run on restart.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True, cleanup_tmp_directories=True)
  # orbax needs an absolute path (a relative --workdir fails inside the async save).
  directory = store.resolve_path(workdir)
  return ocp.CheckpointManager(directory / store.CHECKPOINT_SUBDIR, options=options,
                               item_handlers=handlers)


def save(manager: ocp.CheckpointManager, state: TrainState,
         data_iter: grain.DatasetIterator | None = None, *, step: int | None = None,
         json_items: dict[str, Any] | None = None) -> None:
  """Saves state (+ the iterator position, + JSON items) as checkpoint `step` (async per manager).

  step: default int(state.step) (a loop counting something else, e.g. RL iterations, passes
  its own). Device arrays, the iterator state and the JSON items are captured before this
  returns, so the caller may donate `state` and advance `data_iter` right away.
  """
  items = state.to_checkpoint()
  step = int(state.step) if step is None else step
  args = dict(model=ocp.args.StandardSave(items["model"]),
              optimizer=ocp.args.StandardSave(items["optimizer"]),
              step=ocp.args.JsonSave({"step": int(state.step), "checkpoint": step}))
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  args.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
  manager.save(step, args=ocp.args.Composite(**args))


def _path_str(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  if parts and parts[-1] == "value":  # nnx.Variable's payload, not part of the name.
    parts = parts[:-1]
  return "/".join(parts)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract: TrainState) -> None:
  """Raises CheckpointMismatchError if the checkpoint's array shapes differ from abstract's.

  Reads only the checkpoint metadata, so a mismatch is reported before anything is
  restored and the checkpoint is left untouched.
  """
  metadata = manager.item_metadata(step)
  target = abstract.to_checkpoint()
  problems = []
  for item in ("model", "optimizer"):  # The optimizer only if the model matches: same paths.
    if problems:
      break
    problems = store.shape_problems(item, metadata[item], target[item])
  store.raise_mismatch(manager.directory / str(step), problems)


def restore(manager: ocp.CheckpointManager, abstract: TrainState,
            data_iter: grain.DatasetIterator | None = None, step: int | None = None
            ) -> TrainState | None:
  """Restores `step` (default: the latest) into abstract's structure; None if no checkpoint.

  data_iter (if given) is moved in place to the saved position. Shapes are checked first
  (check_compatible). JSON items: `restore_json`.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  check_compatible(manager, step, abstract)
  target = abstract.to_checkpoint()
  args = dict(model=ocp.args.StandardRestore(target["model"]),
              optimizer=ocp.args.StandardRestore(target["optimizer"]),
              step=ocp.args.JsonRestore())
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  saved = restored["step"]
  if saved.get("checkpoint", saved["step"]) != step:
    raise CheckpointMismatchError(
        f"checkpoint {manager.directory / str(step)} holds step={saved}, expected {step}")
  return TrainState.from_checkpoint({"model": restored["model"],
                                     "optimizer": restored["optimizer"],
                                     "step": saved["step"]})


def restore_json(manager: ocp.CheckpointManager, name: str, step: int) -> Any:
  """The JSON item `name` (create_manager's json_items) of checkpoint `step`."""
  return manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]


def restore_or_init(manager: ocp.CheckpointManager, abstract: TrainState,
                    data_iter: grain.DatasetIterator,
                    init: Callable[[], TrainState]) -> TrainState:
  """The latest checkpoint restored into `abstract` (and data_iter), else init(); logs which."""
  state = restore(manager, abstract, data_iter)
  if state is None:
    state = init()
    logging.info("Initialised a new model: %d parameters.", num_params(state.params))
  else:
    logging.info("Resumed from the checkpoint at step %d in %s.", int(state.step),
                 manager.directory)
  return state


def init_from(config: ml_collections.ConfigDict, tx: Any, path: str, *,
              sharding: Any = None) -> TrainState:
  """A new TrainState (step 0, fresh optimizer) whose model weights come from checkpoint `path`.

  config.train.init_from's meaning (fine-tuning); the checkpoint's model must have config's
  shapes (CheckpointMismatchError lists the arrays that differ).
  """
  _, model = store.restore_model(path, config)
  state = new_train_state(model, tx)
  return state if sharding is None else jax.device_put(state, sharding)


