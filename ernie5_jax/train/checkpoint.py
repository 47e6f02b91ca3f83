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

import contextlib
import errno
import json
import shutil
import time
import uuid
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.path import atomicity

from ernie5_jax import store
from ernie5_jax.store import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError
from ernie5_jax.train.state import TrainState, new_train_state, num_params

TMP_SUFFIX = atomicity.atomicity_types.TMP_DIR_SUFFIX  # "<step>.orbax-checkpoint-tmp..."
CORRUPT_SUFFIX = ".corrupt"  # A step that failed to restore, moved aside (never deleted).
# Data fields a resumed iterator position depends on; the rest (paths, skip policy) may change.
_DATA_POSITION_FREE = ("data_dir", "skip_corrupt", "max_skip_fraction")


class _RunTemporaryPath(atomicity.AtomicRenameTemporaryPath):
  """orbax's atomic-rename temporary step directory, named uniquely per run
  ("<step>.orbax-checkpoint-tmp-<run id>"), so that two writers never share one."""

  RUN_ID = uuid.uuid4().hex[:8]

  @classmethod
  def from_final(cls, final_path: epath.Path, **kwargs) -> "_RunTemporaryPath":
    tmp = final_path.parent / f"{final_path.name}{TMP_SUFFIX}-{cls.RUN_ID}"
    return cls(tmp, final_path, **kwargs)


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
                                         create=True, cleanup_tmp_directories=True,
                                         temporary_path_class=_RunTemporaryPath)
  # orbax needs an absolute path (a relative --workdir fails inside the async save).
  directory = store.resolve_path(workdir)
  return ocp.CheckpointManager(directory / store.CHECKPOINT_SUBDIR, options=options,
                               item_handlers=handlers)


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint records of the run that wrote it: the data config its iterator position
  counts in (batches of data.global_batch_size) and train.num_steps (the schedule's length)."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in _DATA_POSITION_FREE}
  # Through JSON, so that it compares equal to what a checkpoint read back (tuples -> lists).
  return {"data": json.loads(store.config_lib.to_json(ml_collections.ConfigDict(data))),
          "num_steps": int(config.train.num_steps)}


def save(manager: ocp.CheckpointManager, state: TrainState,
         data_iter: grain.DatasetIterator | None = None, *, step: int | None = None,
         json_items: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> None:
  """Saves state (+ the iterator position, + JSON items) as checkpoint `step` (async per manager).

  step: default int(state.step) (a loop counting something else, e.g. RL iterations, passes
  its own). run: run_record(config), checked by `restore` on resume. Device arrays, the
  iterator state and the JSON items are captured before this returns, so the caller may
  donate `state` and advance `data_iter` right away. A write that fails (now, or the previous
  async one) raises CheckpointWriteError naming the step and the last good checkpoint.
  """
  items = state.to_checkpoint()
  step = int(state.step) if step is None else step
  args = dict(model=ocp.args.StandardSave(items["model"]),
              optimizer=ocp.args.StandardSave(items["optimizer"]),
              step=ocp.args.JsonSave({"step": int(state.step), "checkpoint": step,
                                      **(run or {})}))
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  args.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
  with write_errors(manager, step):
    _check_previous_write(manager)
    manager.save(step, args=ocp.args.Composite(**args))


def _check_previous_write(manager: ocp.CheckpointManager) -> None:
  """Waits for the previous async write; raises if it left a half-written step behind.

  orbax logs (and swallows) an error of its background commit thread, so the only sure sign
  of a failed write is its temporary directory still on disk once the write is over.
  """
  manager.wait_until_finished()
  manager.check_for_errors()
  partial = _tmp_steps(manager.directory)
  if partial:
    raise OSError(f"step {max(partial)} was not committed (see the log above for orbax's "
                  "error)")


def _tmp_steps(directory: epath.Path) -> dict[int, list[epath.Path]]:
  """The half-written step directories under checkpoints/, by step."""
  out: dict[int, list[epath.Path]] = {}
  for d in directory.iterdir() if directory.is_dir() else ():
    head, sep, _ = d.name.partition(TMP_SUFFIX)
    if sep and head.isdigit():
      out.setdefault(int(head), []).append(d)
  return out


def committed_steps(manager: ocp.CheckpointManager) -> list[int]:
  """Steps whose directories were committed (read from disk, not the manager's cache)."""
  return sorted(int(d.name) for d in manager.directory.iterdir() if d.name.isdigit())


def is_out_of_space(error: BaseException | None) -> bool:
  """True for a full disk or quota anywhere in the exception chain (OSError or a
  tensorstore RESOURCE_EXHAUSTED / "No space left on device" message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class write_errors:  # pylint: disable=invalid-name  (used as a context manager)
  """Turns any failure of a checkpoint write inside the block into CheckpointWriteError.

  The error names the step that failed (the half-written directory left on disk, else
  `step`) and the newest committed one; the half-written directories are removed, so a
  restart resumes from that last good checkpoint.
  """

  def __init__(self, manager: ocp.CheckpointManager, step: int | None = None):
    self.manager, self.step = manager, step

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, tb) -> bool:
    if error is None or not isinstance(error, Exception) or isinstance(error, store.WorkdirError):
      return False
    directory = self.manager.directory
    with contextlib.suppress(Exception):  # The write's other threads end (or fail) first.
      self.manager.wait_until_finished()
    partial = _tmp_steps(directory)
    failed = max(partial) if partial else self.step
    clean = 0
    for _ in range(10):  # Commit threads may still be creating files: clean twice in a row.
      for paths in _tmp_steps(directory).values():
        for path in paths:
          shutil.rmtree(path, ignore_errors=True)
      clean = clean + 1 if not _tmp_steps(directory) else 0
      if clean == 2:
        break
      time.sleep(0.3)
    good = committed_steps(self.manager)
    last = (f"the last good checkpoint is step {good[-1]} ({directory / str(good[-1])}), where a "
            "restart resumes" if good else "there is no good checkpoint yet")
    cause = ("no space left on device" if is_out_of_space(error)
             else store.error_line(error))
    fix = ("free space on (or move) --workdir, then run again" if is_out_of_space(error)
           else "fix the cause, then run again")
    raise CheckpointWriteError(
        f"writing checkpoint step {failed} to {directory} failed ({cause}); the partial "
        f"step was removed and {last}: {fix}") from error


def finish_writes(manager: ocp.CheckpointManager) -> None:
  """Waits for pending async writes and closes manager; a failed write is CheckpointWriteError."""
  try:
    with write_errors(manager):
      _check_previous_write(manager)
  finally:
    manager.close()


def _check_run(manager: ocp.CheckpointManager, step: int, saved: dict,
               run: dict[str, Any] | None) -> None:
  """Refuses a resume whose data stream differs from the checkpoint's (CheckpointMismatchError)."""
  if not run or "data" not in saved:  # RL / checkpoints written before runs were recorded.
    return
  was, now = saved["data"], run["data"]
  changed = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
  if changed:
    fields = ", ".join(f"data.{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed)
    raise CheckpointMismatchError(
        f"checkpoint {manager.directory / str(step)} was written reading another data stream "
        f"({fields}); its iterator position would skip or repeat examples. Resume with the "
        "run's values (config.json in the workdir), or start a new --workdir")


def _log_new_length(step: int, saved: dict, run: dict[str, Any] | None) -> None:
  """Logs a train.num_steps that differs from the restored checkpoint's run."""
  if run and saved.get("num_steps") not in (None, run["num_steps"]):
    logging.warning(
        "config.train.num_steps changed from %d to %d on resume at step %d: the "
        "learning-rate schedule is recomputed for the new length (its decay phase moves with "
        "the end), and steps after %d follow it.",
        saved["num_steps"], run["num_steps"], step, step)


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
                  data_iter: grain.DatasetIterator | None, run: dict[str, Any] | None
                  ) -> TrainState:
  """Restores one step; CheckpointCorruptError if its files cannot be read."""
  where = manager.directory / str(step)
  try:
    metadata = manager.item_metadata(step)
    saved = manager.restore(step, args=ocp.args.Composite(step=ocp.args.JsonRestore()))["step"]
  except Exception as e:  # pylint: disable=broad-except  (unreadable metadata or step JSON)
    raise CheckpointCorruptError(f"{where}: {store.error_line(e)}") from e
  if not metadata.get("model") or not metadata.get("optimizer"):
    raise CheckpointCorruptError(f"{where}: its array metadata is missing or unreadable")
  target = abstract.to_checkpoint()
  problems = []
  for item in ("model", "optimizer"):  # The optimizer only if the model matches: same paths.
    problems = problems or store.shape_problems(item, metadata[item], target[item])
  store.raise_mismatch(where, problems)
  _check_run(manager, step, saved, run)
  args = dict(model=ocp.args.StandardRestore(target["model"]),
              optimizer=ocp.args.StandardRestore(target["optimizer"]))
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # pylint: disable=broad-except  (truncated array or iterator files)
    raise CheckpointCorruptError(f"{where}: {store.error_line(e)}") from e
  if saved.get("checkpoint", saved["step"]) != step:
    raise CheckpointMismatchError(f"checkpoint {where} holds step={saved}, expected {step}")
  _log_new_length(step, saved, run)
  return TrainState.from_checkpoint({"model": restored["model"],
                                     "optimizer": restored["optimizer"],
                                     "step": saved["step"]})


def _move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Renames a corrupt step out of orbax's step names (kept for inspection, never deleted)."""
  path = manager.directory / str(step)
  target = path.parent / f"{step}{CORRUPT_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
  path.rename(target)
  return target


def restore(manager: ocp.CheckpointManager, abstract: TrainState,
            data_iter: grain.DatasetIterator | None = None, step: int | None = None, *,
            run: dict[str, Any] | None = None) -> TrainState | None:
  """Restores `step` (default: the newest that can be read) into abstract; None if none.

  data_iter (if given) is moved in place to the saved position; shapes are checked first,
  then the data stream against run (run_record). Without `step`, a newest checkpoint that
  cannot be read is skipped with one warning each and moved aside to
  "<step>.corrupt-<time>" once an older one restored, so training goes on from there; when
  none restores, CheckpointCorruptError names them all and nothing is moved. JSON items:
  `restore_json`.
  """
  if step is not None:
    return _restore_step(manager, step, abstract, data_iter, run)
  bad = []
  for candidate in reversed(committed_steps(manager)):
    try:
      state = _restore_step(manager, candidate, abstract, data_iter, run)
    except CheckpointCorruptError as e:
      logging.warning("Checkpoint step %d is unreadable, trying the one before it: %s",
                      candidate, e)
      bad.append((candidate, e))
      continue
    for b, _ in bad:
      logging.warning("Moved the unreadable checkpoint step %d aside to %s; resuming from "
                      "step %d.", b, _move_aside(manager, b), candidate)
    if bad:
      manager.reload()
    return state
  if bad:
    raise CheckpointCorruptError(
        f"no checkpoint in {manager.directory} can be read (steps "
        f"{[b for b, _ in bad]}; newest: {bad[0][1]}): move them aside to start from scratch, "
        "or restore the workdir from a copy")
  return None


def restore_json(manager: ocp.CheckpointManager, name: str, step: int) -> Any:
  """The JSON item `name` (create_manager's json_items) of checkpoint `step`."""
  return manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]


def restore_or_init(manager: ocp.CheckpointManager, abstract: TrainState,
                    data_iter: grain.DatasetIterator,
                    init: Callable[[], TrainState], *,
                    run: dict[str, Any] | None = None) -> TrainState:
  """The newest readable checkpoint restored into `abstract` (and data_iter), else init();
  logs which. run: run_record(config), see `restore`."""
  state = restore(manager, abstract, data_iter, run=run)
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


