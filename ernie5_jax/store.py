"""The model store: where every job finds a model by path, with its config.

A training run writes `<workdir>/config.json` (the resolved config) beside
`<workdir>/checkpoints/<step>/model/` (train/checkpoint.py); an exported sub-model is a
directory with `model/` + `config.json` (elastic_export.py, written by `save_model`). Every
job (eval, generate, export, RL, fine-tuning's train.init_from) restores a model from any of
those paths here:

  loc = locate(path)                                   # workdir, checkpoints/, a step, an export
  config = resolve_config(loc, cli_config, overrides)  # the stored config + --config.* overrides
  config, model = restore_model(loc, config)           # read-only, shapes checked first

The errors a user fixes from the command line are defined here, each with a message that
names the path and what is accepted (main.py prints them in one line).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.model import create_model

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"  # The resolved config, next to checkpoints/ (or an export's model/).
MODEL_ITEM = "model"  # The checkpoint item holding nnx.state(model).
_MAX_REPORTED = 3  # Mismatched paths listed in one error.


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer built from the config."""


class CheckpointNotFoundError(FileNotFoundError):
  """A path holds no checkpoint (or no config to rebuild its model)."""


class CheckpointCorruptError(ValueError):
  """A checkpoint's files cannot be read (truncated, garbage metadata, a torn copy)."""


class CheckpointWriteError(WorkdirError):
  """A checkpoint could not be written (disk full, quota, permissions)."""


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


def _path_str(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  if parts and parts[-1] == "value":  # nnx.Variable's payload, not part of the name.
    parts = parts[:-1]
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_problems(item: str, saved_tree, wanted_tree) -> list[str]:
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


def raise_mismatch(where, problems: list[str]) -> None:
  """Raises CheckpointMismatchError listing (the first few of) problems, if any."""
  if problems:
    more = f"; ... and {len(problems) - _MAX_REPORTED} more" if len(
        problems) > _MAX_REPORTED else ""
    raise CheckpointMismatchError(  # One line: the CLI's error is its last line.
        f"checkpoint {where} does not match the model built from the config "
        f"({len(problems)} mismatched arrays; nothing was restored): "
        + "; ".join(problems[:_MAX_REPORTED]) + more + ": use the config it was trained "
        "with (its config.json), or a new --workdir to train another model")


_EXPECTED = ("expected a training workdir (holding checkpoints/<step>/model/), its "
             "checkpoints/ directory, one checkpoints/<step>/ directory, or an exported model "
             f"directory (model/ + {CONFIG_FILE})")


def save_config(config: ml_collections.ConfigDict, directory: str) -> str:
  """Writes config_lib.to_json(config) to <directory>/config.json (atomically); returns the path."""
  path = epath.Path(directory) / CONFIG_FILE
  tmp = path.parent / f".{CONFIG_FILE}.tmp{os.getpid()}"
  try:
    tmp.write_text(config_lib.to_json(config) + "\n")
    tmp.replace(path)  # Atomic, and overwrites the config.json of an earlier run.
  except OSError as e:  # A full disk or a read-only directory: the old config.json stays.
    tmp.unlink(missing_ok=True)
    raise WorkdirError(f"could not write {path} ({type(e).__name__}: {e.strerror or e}): "
                       "free space in (or pick another) --workdir and run again") from e
  return str(path)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config save_config (or an export) wrote: `path` is the JSON file or its directory.

  An LM config gets the fields added to default_config() since the run was trained, with
  their defaults (e.g. an older run's config has no `eval` section).
  """
  p = resolve_path(path)
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


def resolve_path(path: str) -> epath.Path:
  """`path` as an absolute epath: local paths against the current directory; gs:// and the
  like as given. orbax reads no metadata from a relative path (its StandardCheckpointer
  returns None there, which would read as "every array missing")."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def locate(path: str, step: int | None = None) -> CheckpointLocation:
  """Resolves a workdir / checkpoints dir / step dir / exported dir to its model and config.

  `step` picks a step of a workdir or checkpoints/ dir (default: the latest). Raises
  CheckpointNotFoundError naming the path and the layouts accepted.
  """
  p = resolve_path(path)
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
  require_lm(config, loc.model_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      saved = checkpointer.metadata(loc.model_dir).item_metadata
    except Exception as e:  # pylint: disable=broad-except  (any unreadable metadata)
      raise corrupt_error(loc, e) from e
    if not saved:  # Garbage _METADATA parses to nothing: corruption, not a config mismatch.
      raise corrupt_error(loc, ValueError("its metadata lists no arrays"))
    raise_mismatch(loc.model_dir, shape_problems(MODEL_ITEM, saved, target))
    try:
      state = checkpointer.restore(loc.model_dir, target)
    except Exception as e:  # pylint: disable=broad-except  (truncated or missing array files)
      raise corrupt_error(loc, e) from e
  logging.info("Restored the model of %s%s.", loc.model_dir,
               "" if loc.step is None else f" (step {loc.step})")
  return config, nnx.merge(graphdef, state)


def require_lm(config: ml_collections.ConfigDict, where) -> None:
  """Raises ConfigError unless config is a unified-decoder ("lm") run's."""
  family = config.get("trainer", "lm")
  if family != "lm":
    raise config_lib.ConfigError(
        f"checkpoint {where} is a config.trainer={family!r} run: this mode reads unified-"
        "decoder (config.trainer='lm') checkpoints only; evaluate an M2CP run with its own "
        "trainer (python -m ernie5_jax.main --config=experiments/m2cp_shapes.py ...)")


def error_line(error: BaseException) -> str:
  """The first line of an exception's message, with its type (orbax errors run long)."""
  text = str(error).strip().splitlines()
  first = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(error).__name__}: {first[:200]}"


def corrupt_error(loc: CheckpointLocation, error: BaseException) -> CheckpointCorruptError:
  """CheckpointCorruptError for loc naming the cause and the newest older step to use instead."""
  older = []
  if loc.step is not None:
    ckpts = loc.model_dir.parent.parent
    older = [s for s in _steps(ckpts) if s < loc.step]
  hint = (f"pass --checkpoint={loc.model_dir.parent.parent / str(older[-1])} (step "
          f"{older[-1]}, the newest older checkpoint), or delete {loc.model_dir.parent}"
          if older else "it is the only checkpoint there: restore it from a copy or retrain")
  step = "" if loc.step is None else f"step {loc.step} "
  return CheckpointCorruptError(f"checkpoint {step}at {loc.model_dir} is corrupt or incomplete "
                                f"({error_line(error)}): {hint}")


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
  require_lm(config, loc.model_dir)
  input_pipeline.validate(config)
  return config


def apply_override(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
                   path: str) -> None:
  """config.<path> = overrides.<path> for a dotted path (e.g. "eval.num_batches")."""
  *parents, leaf = path.split(".")
  src, dst = overrides, config
  for part in parents:
    src, dst = src[part], dst[part]
  dst[leaf] = src[leaf]


def save_model(directory: str, config: ml_collections.ConfigDict, model_state: nnx.State) -> str:
  """Writes a standalone model: <directory>/model/ (orbax) + config.json; returns directory.

  What elastic_export writes and `locate` / `restore_model` read back; the directory must not
  hold a model already (FileExistsError).
  """
  directory = os.path.abspath(directory)
  model_dir = os.path.join(directory, MODEL_ITEM)
  if os.path.exists(model_dir):
    raise FileExistsError(f"export directory {directory!r} already holds a {MODEL_ITEM}/: "
                          "expected a new or empty directory")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(model_dir, model_state)
    checkpointer.wait_until_finished()
  save_config(config, directory)
  return directory
