"""Orbax checkpoints of the train state plus the grain iterator state.

Layout: `<workdir>/checkpoints/<step>/` with four items,
  model      StandardSave  nnx.State of the decoder (params + RouterBias, ...)
  optimizer  StandardSave  optax state
  step       JsonSave      {"step": int}
  data       grain         this process's iterator state (process_<i>-of-<n>.json)
so an eval job can restore just "model", and a killed run resumes on exactly the
batch it would have read next.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ernie5_jax.train.state import TrainState, num_params

CHECKPOINT_SUBDIR = "checkpoints"
_MAX_REPORTED = 5  # Mismatched paths listed in one error.


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer built from the config."""


def ensure_writable(workdir: str) -> None:
  """Creates workdir if needed and checks that a file can be written in it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe_"):
      pass
  except OSError as e:
    raise WorkdirError(
        f"--workdir={workdir!r} is not accepted: expected a directory this process can "
        f"create and write ({type(e).__name__}: {e.strerror or e})") from e


def _handlers() -> dict[str, Any]:
  return {"model": ocp.StandardCheckpointHandler(),
          "optimizer": ocp.StandardCheckpointHandler(),
          "step": ocp.JsonCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler()}


def create_manager(workdir: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
  """Returns a CheckpointManager on <workdir>/checkpoints keeping the last `keep` steps."""
  # cleanup_tmp_directories: drop the half-written step of a killed run on restart.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True, cleanup_tmp_directories=True)
  # orbax needs an absolute path (a relative --workdir fails inside the async save).
  directory = epath.Path(workdir)
  if "://" not in workdir:  # Local paths; gs:// and the like are already absolute.
    directory = epath.Path(os.path.abspath(workdir))
  return ocp.CheckpointManager(directory / CHECKPOINT_SUBDIR, options=options,
                               item_handlers=_handlers())


def save(manager: ocp.CheckpointManager, state: TrainState,
         data_iter: grain.DatasetIterator) -> None:
  """Saves state and the iterator position at step int(state.step) (async per manager).

  Device arrays and the iterator state are captured before this returns, so the
  caller may donate `state` and advance `data_iter` right away.
  """
  step = int(state.step)
  items = state.to_checkpoint()
  manager.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(items["model"]),
      optimizer=ocp.args.StandardSave(items["optimizer"]),
      step=ocp.args.JsonSave({"step": step}),
      data=grain.checkpoint.CheckpointSave(data_iter)))


def _path_str(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  if parts and parts[-1] == "value":  # nnx.Variable's payload, not part of the name.
    parts = parts[:-1]
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


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
    saved, wanted = _shapes(metadata[item]), _shapes(target[item])
    for path in sorted(wanted.keys() | saved.keys()):
      if path not in saved:
        problems.append(f"{item}/{path}: missing in the checkpoint (model expects shape "
                        f"{wanted[path]})")
      elif path not in wanted:
        problems.append(f"{item}/{path}: in the checkpoint (shape {saved[path]}) but not in "
                        "the model")
      elif saved[path] != wanted[path]:
        problems.append(f"{item}/{path}: checkpoint shape {saved[path]} != model shape "
                        f"{wanted[path]}")
  if problems:
    more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(
        problems) > _MAX_REPORTED else ""
    raise CheckpointMismatchError(
        f"checkpoint {manager.directory / str(step)} does not match the model built from the "
        f"config ({len(problems)} mismatched arrays); nothing was restored:\n  "
        + "\n  ".join(problems[:_MAX_REPORTED]) + more)


def restore(manager: ocp.CheckpointManager, abstract: TrainState,
            data_iter: grain.DatasetIterator, step: int | None = None) -> TrainState | None:
  """Restores `step` (default: the latest) into abstract's structure; None if no checkpoint.

  data_iter is moved in place to the saved position. Shapes are checked first
  (check_compatible).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  check_compatible(manager, step, abstract)
  target = abstract.to_checkpoint()
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target["model"]),
      optimizer=ocp.args.StandardRestore(target["optimizer"]),
      step=ocp.args.JsonRestore(),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  if restored["step"]["step"] != step:
    raise CheckpointMismatchError(
        f"checkpoint {manager.directory / str(step)} holds step={restored['step']['step']}, "
        f"expected {step}")
  return TrainState.from_checkpoint({"model": restored["model"],
                                     "optimizer": restored["optimizer"], "step": step})


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
