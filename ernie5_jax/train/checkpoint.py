"""Orbax checkpoints of the train state plus the grain iterator state.

Layout: `<workdir>/checkpoints/<step>/` with four items,
  model      StandardSave  nnx.State of the decoder (params + RouterBias, ...)
  optimizer  StandardSave  optax state
  step       JsonSave      {"step": int}
  data       grain         this process's iterator state (process_<i>-of-<n>.json)
so an eval job can restore just "model", and a killed run resumes on exactly the
batch it would have read next. The trainer also writes the resolved config to
`<workdir>/config.json` (save_config / load_config), so that a model is restored from a
path alone:

  config, model = restore_model(path)   # a workdir, its checkpoints/ dir, one step dir,
                                        # or a directory with model/ + config.json
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.train.state import TrainState, create_model, new_train_state, num_params

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"  # The resolved config, next to checkpoints/ (or an export's model/).
MODEL_ITEM = "model"  # The checkpoint item holding nnx.state(model).
_MAX_REPORTED = 5  # Mismatched paths listed in one error.


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer built from the config."""


class CheckpointNotFoundError(FileNotFoundError):
  """A path holds no checkpoint (or no config to rebuild its model)."""


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


def create_manager(workdir: str, *, keep: int, async_save: bool,
                   handlers: dict[str, Any] | None = None) -> ocp.CheckpointManager:
  """Returns a CheckpointManager on <workdir>/checkpoints keeping the last `keep` steps.

  handlers: its items (default: model, optimizer, step, data: what `save` writes).
  """
  # cleanup_tmp_directories: drop the half-written step of a killed run on restart.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True, cleanup_tmp_directories=True)
  # orbax needs an absolute path (a relative --workdir fails inside the async save).
  directory = epath.Path(workdir)
  if "://" not in workdir:  # Local paths; gs:// and the like are already absolute.
    directory = epath.Path(os.path.abspath(workdir))
  return ocp.CheckpointManager(directory / CHECKPOINT_SUBDIR, options=options,
                               item_handlers=_handlers() if handlers is None else handlers)


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
    problems = _shape_problems(item, metadata[item], target[item])
  _raise_mismatch(manager.directory / str(step), problems)


def _shape_problems(item: str, saved_tree, wanted_tree) -> list[str]:
  """One line per array whose path or shape differs between a checkpoint and a target."""
  saved, wanted = _shapes(saved_tree), _shapes(wanted_tree)
  problems = []
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
  return problems


def _raise_mismatch(where, problems: list[str]) -> None:
  if problems:
    more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(
        problems) > _MAX_REPORTED else ""
    raise CheckpointMismatchError(
        f"checkpoint {where} does not match the model built from the config "
        f"({len(problems)} mismatched arrays); nothing was restored:\n  "
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


# --- the config next to the checkpoints, and restoring a model from a path ---------------

_EXPECTED = ("expected a training workdir (holding checkpoints/<step>/model/), its "
             "checkpoints/ directory, one checkpoints/<step>/ directory, or an exported model "
             f"directory (model/ + {CONFIG_FILE})")


def save_config(config: ml_collections.ConfigDict, directory: str) -> str:
  """Writes config_lib.to_json(config) to <directory>/config.json (atomically); returns the path."""
  path = epath.Path(directory) / CONFIG_FILE
  tmp = path.parent / f".{CONFIG_FILE}.tmp{os.getpid()}"
  tmp.write_text(config_lib.to_json(config) + "\n")
  tmp.replace(path)  # Atomic, and overwrites the config.json of an earlier run.
  return str(path)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config save_config (or an export) wrote: `path` is the JSON file or its directory.

  An LM config gets the fields added to default_config() since the run was trained, with
  their defaults (e.g. an older run's config has no `eval` section).
  """
  p = epath.Path(path)
  if p.is_dir():
    p = p / CONFIG_FILE
  if not p.exists():
    raise CheckpointNotFoundError(f"{p} does not exist: expected the {CONFIG_FILE} a training "
                                  "run writes into its workdir (train/loop.py)")
  config = config_lib.from_json(p.read_text())
  if config.get("trainer", "lm") == "lm":
    _add_missing(config, config_lib.default_config())
  return config


def _add_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """Adds (recursively) the fields of defaults that config lacks."""
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      _add_missing(config[key], value)


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
  """Where a model checkpoint and its config are (resolved by `locate`)."""
  model_dir: epath.Path  # The orbax item holding nnx.state(model).
  config_path: epath.Path | None  # The config JSON found for it; None if there is none.
  step: int | None  # The training step; None for a directory that is no step directory.


def _steps(directory: epath.Path) -> list[int]:
  """Committed steps under a checkpoints/ directory (orbax's tmp dirs carry a suffix)."""
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and (d / MODEL_ITEM).is_dir())


def locate(path: str, step: int | None = None) -> CheckpointLocation:
  """Resolves a workdir / checkpoints dir / step dir / exported dir to its model and config.

  `step` picks a step of a workdir or checkpoints/ dir (default: the latest). Raises
  CheckpointNotFoundError naming the path and the layouts accepted.
  """
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointNotFoundError(f"checkpoint path {path!r} does not exist: {_EXPECTED}")
  if (p / MODEL_ITEM).is_dir():  # A step directory or an exported model.
    here = int(p.name) if p.name.isdigit() else None
    if step is not None and step != here:
      raise CheckpointNotFoundError(f"checkpoint path {path!r} is one checkpoint (step "
                                    f"{here}), but step={step} was asked for")
    model_dir, found = p / MODEL_ITEM, here
  else:
    ckpts = p / CHECKPOINT_SUBDIR if (p / CHECKPOINT_SUBDIR).is_dir() else p
    steps = _steps(ckpts)
    if not steps:
      raise CheckpointNotFoundError(f"checkpoint path {path!r} holds no checkpoint: {_EXPECTED}")
    if step is not None and step not in steps:
      raise CheckpointNotFoundError(f"step={step} is not accepted: {ckpts} holds steps {steps}")
    found = steps[-1] if step is None else step
    model_dir = ckpts / str(found) / MODEL_ITEM
  # The config sits next to model/ (export), or two levels up (workdir/checkpoints/<step>).
  configs = [d / CONFIG_FILE for d in (model_dir.parent, model_dir.parent.parent,
                                       model_dir.parent.parent.parent)]
  config_path = next((c for c in configs if c.exists()), None)
  return CheckpointLocation(model_dir=model_dir, config_path=config_path, step=found)


def restore_model(path: str | CheckpointLocation,
                  config: ml_collections.ConfigDict | None = None, *, step: int | None = None,
                  sharding: jax.sharding.Sharding | None = None
                  ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """(config, decoder) restored from a path (see `locate`); read-only.

  nnx.state(decoder) is the checkpoint's model state (e.g. for elastic_export).

  Args:
    path: a training workdir, its checkpoints/ dir, one checkpoints/<step>/ dir, an
      exported model directory (model/ + config.json), or a CheckpointLocation.
    config: the model's config; default: the config.json stored with the checkpoint.
    step: the step of a workdir to restore (default: the latest).
    sharding: where the parameters go (default: the first device).
  """
  loc = path if isinstance(path, CheckpointLocation) else locate(path, step)
  if config is None:
    if loc.config_path is None:
      raise CheckpointNotFoundError(
          f"no {CONFIG_FILE} next to checkpoint {loc.model_dir} (looked in its parent and "
          "the workdir): the run predates stored configs; pass the run's config (config=, or "
          "--config with its overrides on the command line)")
    config = load_config(str(loc.config_path))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(config)))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(loc.model_dir).item_metadata
    _raise_mismatch(loc.model_dir, _shape_problems(MODEL_ITEM, saved, target))
    state = checkpointer.restore(loc.model_dir, target)
  logging.info("Restored the model of %s%s.", loc.model_dir,
               "" if loc.step is None else f" (step {loc.step})")
  return config, nnx.merge(graphdef, state)


def init_from(config: ml_collections.ConfigDict, tx: Any, path: str, *,
              sharding: Any = None) -> TrainState:
  """A new TrainState (step 0, fresh optimizer) whose model weights come from checkpoint `path`.

  config.train.init_from's meaning (fine-tuning); the checkpoint's model must have config's
  shapes (CheckpointMismatchError lists the arrays that differ).
  """
  _, model = restore_model(path, config)
  state = new_train_state(model, tx)
  return state if sharding is None else jax.device_put(state, sharding)


def resolve_config(loc: CheckpointLocation, config: ml_collections.ConfigDict | None,
                   override_fields: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The checkpoint's stored config with override_fields taken from config, validated.

  config is the command line's --config: used whole only without a stored config.json;
  otherwise only its `override_fields` (dotted paths set as --config.*) replace stored values.
  """
  if override_fields and config is None:
    raise config_lib.ConfigError(f"config overrides {override_fields} need --config (the "
                                 "experiment file that declares the fields)")
  if loc.config_path is not None:
    stored = load_config(str(loc.config_path))
    for path in override_fields:
      apply_override(stored, config, path)
    if config is not None and not override_fields:
      logging.info("Using the config stored with the checkpoint (%s); --config only supplies "
                   "--config.* overrides.", loc.config_path)
    config = stored
  elif config is None:
    raise CheckpointNotFoundError(
        f"no {CONFIG_FILE} next to checkpoint {loc.model_dir}: pass the training "
        "run's --config (with its overrides)")
  else:
    config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  config_lib.validate(config)
  return config


def apply_override(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
                   path: str) -> None:
  """config.<path> = overrides.<path> for a dotted path (e.g. "eval.num_batches")."""
  *parents, leaf = path.split(".")
  src, dst = overrides, config
  for part in parents:
    src, dst = src[part], dst[part]
  dst[leaf] = src[leaf]
