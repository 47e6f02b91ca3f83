"""Command line entry point.

  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=20 --config.model.top_k=1

  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py:frac=0.02 --workdir=/tmp/m2cp

Trains from the latest checkpoint in --workdir (or from scratch) to
config.train.num_steps; running it again resumes, or says there is nothing to do.
config.trainer picks the model family (FAMILIES; absent: "lm").
"""

from __future__ import annotations

import difflib
import importlib
import logging as py_logging
import runpy
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ernie5_jax import config as config_lib

MODES = ("train",)  # eval and export come with their own issues.
# config.trainer -> (the family's config module with validate(), its trainer module with
# train_and_evaluate() and NonFiniteLossError); a config without `trainer` is "lm".
FAMILIES = {"lm": ("ernie5_jax.config", "ernie5_jax.train.loop"),
            "m2cp": ("ernie5_jax.m2cp.config", "ernie5_jax.m2cp.train")}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax (a dozen lines per save) and grain; warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= py_logging.WARNING or not noisy


def _unknown_override(argv: list[str]) -> str | None:
  """Names the first --config.a.b override whose field the config file does not declare."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return None
  path, _, arg = config_arg.partition(":")
  get_config = runpy.run_path(path)["get_config"]
  config = get_config(arg) if arg else get_config()
  for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--config.")):
    node, parents = config, ["config"]
    for part in flag[len("--config."):].split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"{flag} is not accepted: {'.'.join(parents)} is a value, not a group of fields"
      if part not in node:
        fields = list(node.keys())
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it has {fields}"
        return (f"{flag} is not accepted: {'.'.join(parents)} has no field {part!r}{hint}")
      node, parents = node[part], parents + [part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; an override of a field the config lacks fails in one clear line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # Bad values (wrong type, --mode not in MODES): absl's message.
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
             "on flags.")
  except (KeyError, AttributeError) as e:  # config_flags walking --config.a.b with no a.b.
    sys.exit(f"error: {_unknown_override(argv) or e}")


def main(argv: list[str]) -> None:
  """Validates the config, then runs --mode."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  family = FLAGS.config.get("trainer", "lm")
  if family not in FAMILIES:
    sys.exit(f"error: config.trainer={family!r} is not accepted: expected one of "
             f"{sorted(FAMILIES)}")
  config_module, trainer_module = FAMILIES[family]
  try:  # The family's own validate(), before any import of the trainer or compile.
    importlib.import_module(config_module).validate(FLAGS.config)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  logging.get_absl_handler().addFilter(_QuietLibraries())

  # Imported here so that --help and config errors do not pay for TensorFlow's import
  # (clu's TensorBoard writer).
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  trainer = importlib.import_module(trainer_module)

  # TF is only used to write TensorBoard events: hide accelerators from it so that it
  # reserves no memory JAX needs (as in the Flax examples).
  tf.config.set_visible_devices([], "GPU")
  logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (checkpoint.WorkdirError, checkpoint.CheckpointMismatchError,
          trainer.NonFiniteLossError) as e:
    # Errors the user fixes from the command line: one clear line, no traceback.
    sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
