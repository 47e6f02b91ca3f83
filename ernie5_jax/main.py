"""Command line entry point.

  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=20 --config.model.top_k=1

  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py:frac=0.02 --workdir=/tmp/m2cp

  python -m ernie5_jax.main --mode=eval --checkpoint=/tmp/tiny --workdir=/tmp/tiny_eval \
      [--config=experiments/tiny.py --config.eval.num_batches=8]

Trains from the latest checkpoint in --workdir (or from scratch) to
config.train.num_steps; running it again resumes, or says there is nothing to do.
config.trainer picks the model family (FAMILIES; absent: "lm").
--mode=eval (ernie5_jax/eval/job.py) writes the elastic family report and routing analysis
of --checkpoint into --workdir; the config is the one stored with the checkpoint, with the
given --config.* overrides applied (--config alone is used only for a checkpoint that has
no stored config.json).

  python -m ernie5_jax.main --mode=eval --watch --checkpoint=/tmp/tiny --workdir=/tmp/tiny/eval

--mode=eval --watch (ernie5_jax/eval/watch.py) runs beside training: it evaluates each new
checkpoint of the training workdir --checkpoint once (a restarted job skips the steps it
wrote), with TensorBoard events in --workdir, and stops after the trainer's final step or
--watch_timeout seconds without a new checkpoint.

  python -m ernie5_jax.main --mode=export --checkpoint=/tmp/tiny --submodel=2,6,1 \
      --workdir=/tmp/tiny_2_6_1

--mode=export (ernie5_jax/elastic_export.py) writes the elastic sub-model
'depth,experts,top_k' of --checkpoint into --workdir as a standalone, smaller model
(model/ + config.json), which --mode=eval and store.restore_model load like any other.

  python -m ernie5_jax.main --mode=import --hf_checkpoint=/tmp/ERNIE-4.5-0.3B-PT \
      --workdir=/tmp/ernie45
  python -m ernie5_jax.main --mode=export --format=hf --checkpoint=/tmp/ernie45_run \
      [--submodel=2,6,1] --workdir=/tmp/ernie45_hf

--mode=import (ernie5_jax/interop/ernie45.py) reads an ERNIE 4.5 text checkpoint (Hugging
Face safetensors) into the model store's layout; --format=hf writes a model (or a
sub-model) back as one, loadable by transformers (docs/interop.md).

  python -m ernie5_jax.main --mode=generate --checkpoint=/tmp/tiny --workdir=/tmp/tiny_samples

--mode=generate (ernie5_jax/eval/samples.py) writes text continuations, caption->image PNGs
(scored by the digit classifier) and text->audio WAVs of --checkpoint into --workdir, with
decode tokens/s; config.generate sets the sampling (same config rules as --mode=eval).

  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py --workdir=/tmp/rl

--mode=rl (ernie5_jax/rl/train.py) runs RL post-training from config.train.init_from (an
SFT checkpoint: experiments/sft_digits.py, trained by the default --mode=train); running it
again resumes.

  python -m ernie5_jax.main --mode=compile --config=experiments/pod_tpu_v5p.py:L \
      --topology=v5p:4x4x4 --workdir=/tmp/compile_L

--mode=compile (ernie5_jax/aot/compile.py) compiles the train step and the KV-cache decode
step of --config for --topology from this (CPU) host and prints per-chip HBM, FLOPs,
collectives, Mosaic kernels and a roofline step time; compile_report.json goes to --workdir.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: may re-execute this command once
  from ernie5_jax import host_memory as _host_memory
  _host_memory.restart_with_tunable()

import difflib  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib
import logging as py_logging
import os
import runpy
import sys
import threading
import traceback
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ernie5_jax import config as config_lib

MODES = ("train", "eval", "export", "generate", "rl", "compile", "import")
# config.trainer -> (the module whose validate() checks the family's config, its trainer with
# train_and_evaluate()); a config without `trainer` is "lm".
FAMILIES = {"lm": ("ernie5_jax.input_pipeline", "ernie5_jax.train.loop"),
            "m2cp": ("ernie5_jax.m2cp.config", "ernie5_jax.m2cp.train")}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_string("checkpoint", None, "--mode=eval/export: a training workdir, its checkpoints/ "
                    "dir, one checkpoints/<step>/ dir, or an exported model dir.")
flags.DEFINE_string("submodel", None, "--mode=export: the elastic sub-model "
                    "'depth,experts,top_k' (model/elastic.py) of --checkpoint to write, as a "
                    "standalone model, into --workdir.")
flags.DEFINE_bool("watch", False, "--mode=eval: follow the training workdir --checkpoint and "
                  "evaluate each new checkpoint as it lands, until the trainer's final step "
                  "(ernie5_jax/eval/watch.py).")
flags.DEFINE_float("watch_timeout", 3600.0, "--mode=eval --watch: stop after this many seconds "
                   "without a new checkpoint.")
flags.DEFINE_enum("format", "orbax", ("orbax", "hf"), "--mode=export: 'orbax' (model/ + "
                  "config.json, what every job reads) or 'hf' (ERNIE 4.5 safetensors + "
                  "config.json for transformers; --submodel optional; ernie5_jax/interop).")
flags.DEFINE_string("hf_checkpoint", None, "--mode=import: an ERNIE 4.5 Hugging Face checkpoint "
                    "directory (config.json + *.safetensors) to import into --workdir.")
flags.DEFINE_string("calibration_text", None, "--mode=import: a text file whose tokens measure "
                    "the expert loads; each MoE layer's experts are stored most-loaded first.")
flags.DEFINE_string("topology", None, "--mode=compile: the target, e.g. 'v5p:4x4x4' (a TPU "
                    "slice, compiled by libtpu) or 'h100:16' (GPUs, lowered); ernie5_jax/aot.")
flags.mark_flags_as_required(["workdir"])  # --config: required by --mode=train (main).


USAGE_ERROR = 2  # Exit status of every user-facing failure (bad flags, config, paths, data).


def fail(message: str, *, now: bool = False) -> NoReturn:
  """Ends the process with `message` (one line naming the cause and the fix) and status 2.

  now=True skips the interpreter's shutdown (after a full disk, library threads that are still
  retrying writes would print pages of errors while it tears modules down).
  """
  print(message, file=sys.stderr, flush=True)
  if now:
    sys.stdout.flush()
    os._exit(USAGE_ERROR)  # pylint: disable=protected-access
  sys.exit(USAGE_ERROR)


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax (a dozen lines per save) and grain; their warnings and
  errors show as one line each (orbax logs a traceback per failed thread: hundreds of lines
  on a full disk, when the trainer's own error says it in one)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    if (noisy or "/clu/" in record.pathname) and record.levelno >= py_logging.WARNING:
      record.msg = str(record.getMessage()).splitlines()[0][:300] if record.getMessage() else ""
      record.args, record.exc_info, record.exc_text = None, None, None
    return record.levelno >= py_logging.WARNING or not noisy


def _thread_error_in_one_line(args: threading.ExceptHookArgs) -> None:
  """Background threads (orbax's commit threads, clu's writer) report an error in one line;
  the trainer raises the error that matters on its own thread."""
  text = str(args.exc_value).strip().splitlines()
  logging.warning("Error in background thread %s: %s: %s", getattr(args.thread, "name", "?"),
                  args.exc_type.__name__, text[0][:300] if text else "")


def _quiet_libraries() -> None:
  """Installs _QuietLibraries and the one-line thread error report (every job mode)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  threading.excepthook = _thread_error_in_one_line
  # Callbacks from C++ threads (tensorstore futures into a closed asyncio loop) land here.
  sys.unraisablehook = lambda u: logging.warning(
      "Unraisable error in %s: %s: %s", getattr(u.object, "__qualname__", u.object),
      getattr(u.exc_type, "__name__", u.exc_type), str(u.exc_value).splitlines()[:1])


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


def _config_file_error(argv: list[str], error: BaseException) -> str:
  """One line for a --config file that is missing, unparsable or fails in get_config()."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  path = config_arg.partition(":")[0]
  if not os.path.isfile(path):
    return (f"error: --config={config_arg}: no such file {path!r} (relative to "
            f"{os.getcwd()}): expected an experiment file, e.g. experiments/tiny.py")
  if isinstance(error, SyntaxError):
    return (f"error: --config={config_arg}: {path}, line {error.lineno}: "
            f"SyntaxError: {error.msg}")
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f", line {lines[-1]}" if lines else ""
  return f"error: --config={config_arg}: {path}{where}: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad --config file or override fails in one clear line."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is not None and not os.path.isfile(config_arg.partition(":")[0]):
    fail(_config_file_error(argv, FileNotFoundError(config_arg)))  # config_flags defers it.
  try:
    return FLAGS(argv)
  except flags.Error as e:  # Bad values (wrong type, --mode not in MODES): absl's message.
    cause = e.__cause__ or e.__context__
    if any(a.startswith("--config=") for a in argv) and isinstance(
        cause, (OSError, SyntaxError)):
      fail(_config_file_error(argv, cause))
    fail(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
             "on flags.")
  except (KeyError, AttributeError) as e:  # config_flags walking --config.a.b with no a.b.
    fail(f"error: {_unknown_override(argv) or e}")
  except Exception as e:  # pylint: disable=broad-except
    # The --config file itself: missing, unparsable, or get_config() raised.
    fail(_config_file_error(argv, e))


def _override_fields(argv: list[str]) -> tuple[str, ...]:
  """Dotted config fields set on the command line: --config.a.b=v / --config.a.b v -> a.b."""
  return tuple(a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config."))


def _user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions every mode reports in one line (exit 2): bad config, paths, files, data."""
  from ernie5_jax import store  # pylint: disable=g-import-not-at-top
  from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
  return (config_lib.ConfigError, store.WorkdirError, store.CheckpointNotFoundError,
          store.CheckpointMismatchError, store.CheckpointCorruptError, multimodal.DataError,
          FileExistsError)


def _run_eval() -> None:
  """--mode=eval: eval/job.py run_eval on --checkpoint (--watch: eval/watch.py) into --workdir."""
  if not FLAGS.checkpoint:
    fail("error: --mode=eval needs --checkpoint=PATH: a training workdir, its "
             "checkpoints/ dir, one checkpoints/<step>/ dir, or an exported model dir")
  _quiet_libraries()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax.eval import job  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # As in train: TF must not reserve JAX's memory.
  try:
    if FLAGS.watch:
      from ernie5_jax.eval import watch  # pylint: disable=g-import-not-at-top
      watch.watch(FLAGS.checkpoint, FLAGS.workdir, config=FLAGS.config,
                  override_fields=_override_fields(sys.argv[1:]),
                  timeout_secs=FLAGS.watch_timeout)
      return
    job.run_eval(FLAGS.checkpoint, FLAGS.workdir, config=FLAGS.config,
                 override_fields=_override_fields(sys.argv[1:]))
  except _user_errors() as e:
    fail(f"error: {type(e).__name__}: {e}")


def _run_import() -> None:
  """--mode=import: interop/ernie45.py import_checkpoint of --hf_checkpoint into --workdir."""
  if not FLAGS.hf_checkpoint:
    fail("error: --mode=import needs --hf_checkpoint=DIR (an ERNIE 4.5 Hugging Face checkpoint: "
         "config.json + *.safetensors); it writes model/ + config.json to --workdir")
  _quiet_libraries()
  from ernie5_jax.interop import ernie45  # pylint: disable=g-import-not-at-top
  try:
    out = ernie45.import_checkpoint(FLAGS.hf_checkpoint, FLAGS.workdir,
                                    calibration_text=FLAGS.calibration_text)
  except _user_errors() + (ernie45.HFCheckpointError,) as e:
    fail(f"error: {type(e).__name__}: {e}")
  logging.info("Imported %s into %s.", FLAGS.hf_checkpoint, out)


def _run_export_hf() -> None:
  """--mode=export --format=hf: the full model or --submodel of --checkpoint as ERNIE 4.5 HF."""
  if not FLAGS.checkpoint:
    fail("error: --mode=export --format=hf needs --checkpoint=PATH (a training workdir, its "
         "checkpoints/ dir, one checkpoints/<step>/ dir or an exported / imported model dir); "
         "--submodel=depth,experts,top_k is optional")
  _quiet_libraries()
  from ernie5_jax.interop import ernie45  # pylint: disable=g-import-not-at-top
  from ernie5_jax.model import elastic  # pylint: disable=g-import-not-at-top
  try:
    sub = elastic.SubModel.parse(FLAGS.submodel) if FLAGS.submodel else None
    out = ernie45.export_checkpoint(FLAGS.checkpoint, FLAGS.workdir, sub=sub)
  except _user_errors() + (ernie45.HFCheckpointError,) as e:
    fail(f"error: {type(e).__name__}: {e}")
  logging.info("Exported %s of %s to %s (Hugging Face format).", sub or "the model",
               FLAGS.checkpoint, out)


def _run_export() -> None:
  """--mode=export: elastic_export.export_checkpoint of --submodel from --checkpoint."""
  if FLAGS.format == "hf":
    _run_export_hf()
    return
  if not FLAGS.checkpoint or not FLAGS.submodel:
    fail("error: --mode=export needs --checkpoint=PATH (a training workdir, its "
             "checkpoints/ dir or one checkpoints/<step>/ dir) and --submodel=depth,experts,"
             "top_k; it writes the sub-model to --workdir")
  _quiet_libraries()
  from ernie5_jax import elastic_export  # pylint: disable=g-import-not-at-top
  from ernie5_jax.model import elastic  # pylint: disable=g-import-not-at-top
  from ernie5_jax import store  # pylint: disable=g-import-not-at-top
  try:
    sub = elastic.SubModel.parse(FLAGS.submodel)
    location = store.locate(FLAGS.checkpoint)
    # The config stored with the checkpoint; --config only for a checkpoint without one.
    config = None if location.config_path else FLAGS.config
    out = elastic_export.export_checkpoint(FLAGS.checkpoint, sub, FLAGS.workdir, config=config)
  except _user_errors() as e:
    fail(f"error: {type(e).__name__}: {e}")
  logging.info("Exported sub-model %s of %s to %s.", sub, FLAGS.checkpoint, out)


def _run_generate() -> None:
  """--mode=generate: eval/samples.py samples (text, image, audio) of --checkpoint into --workdir."""
  if not FLAGS.checkpoint:
    fail("error: --mode=generate needs --checkpoint=PATH: a training workdir, its "
             "checkpoints/ dir, one checkpoints/<step>/ dir, or an exported model dir")
  _quiet_libraries()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax.eval import samples  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # The data builders import TF: keep JAX's memory.
  try:
    samples.generate_from_checkpoint(FLAGS.checkpoint, FLAGS.workdir, config=FLAGS.config,
                                 override_fields=_override_fields(sys.argv[1:]))
  except _user_errors() as e:
    fail(f"error: {type(e).__name__}: {e}")


def _run_compile() -> None:
  """--mode=compile: aot/compile.py run_compile of --config for --topology."""
  if FLAGS.config is None or not FLAGS.topology:
    fail("error: --mode=compile needs --config=experiments/<name>.py and --topology "
             "(e.g. v5p:2x2x2, v5e:4x4, h100:16)")
  from ernie5_jax.aot import chips  # pylint: disable=g-import-not-at-top
  try:
    topology = chips.parse_topology(FLAGS.topology)
    from ernie5_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    input_pipeline.validate(FLAGS.config)
  except config_lib.ConfigError as e:
    fail(f"error: {e}")
  if topology.chip.platform != "tpu":  # Lowering for GPUs: host devices stand in for them.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={topology.num_devices}").strip()
  _quiet_libraries()
  from ernie5_jax.aot import compile as aot  # pylint: disable=g-import-not-at-top
  try:
    aot.run_compile(FLAGS.config, FLAGS.topology, FLAGS.workdir)
  except _user_errors() + (aot.DoesNotFitError,) as e:
    fail(f"error: {type(e).__name__}: {e}")


def main(argv: list[str]) -> None:
  """Validates the config, then runs --mode."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ernie5_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.skip_absent_tpu()  # Before anything touches a device.
  if FLAGS.mode == "compile":
    _run_compile()
    return
  if FLAGS.mode == "eval":
    _run_eval()
    return
  if FLAGS.mode == "export":
    _run_export()
    return
  if FLAGS.mode == "import":
    _run_import()
    return
  if FLAGS.mode == "generate":
    _run_generate()
    return
  if FLAGS.config is None:
    fail(f"error: --mode={FLAGS.mode} needs --config=experiments/<name>.py")
  family = FLAGS.config.get("trainer", "lm")
  if family not in FAMILIES:
    fail(f"error: config.trainer={family!r} is not accepted: expected one of "
             f"{sorted(FAMILIES)}")
  config_module, trainer_module = FAMILIES[family]
  try:  # The family's own validate(), before any import of the trainer or compile.
    importlib.import_module(config_module).validate(FLAGS.config)
  except config_lib.ConfigError as e:
    fail(f"error: {e}")
  _quiet_libraries()

  # Imported here so that --help and config errors do not pay for TensorFlow's import
  # (clu's TensorBoard writer).
  import jax  # pylint: disable=g-import-not-at-top
  # Multi-host runs (config.distributed or the launcher's environment): before anything
  # touches a device.
  distributed.maybe_initialize(FLAGS.config)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax.train import metrics  # pylint: disable=g-import-not-at-top
  trainer = importlib.import_module(trainer_module)

  # TF is only used to write TensorBoard events: hide accelerators from it so that it
  # reserves no memory JAX needs (as in the Flax examples).
  tf.config.set_visible_devices([], "GPU")
  logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  run = trainer.train_and_evaluate
  if FLAGS.mode == "rl":
    if family != "lm":
      fail(f"error: --mode=rl trains the unified model: config.trainer={family!r} is not "
               "accepted (expected 'lm' or absent)")
    run = importlib.import_module("ernie5_jax.rl.train").train_rl
  from ernie5_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from ernie5_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    with workdir_lib.lock(FLAGS.workdir, primary=jax.process_index() == 0):
      run(FLAGS.config, FLAGS.workdir)
  except _user_errors() + (metrics.NonFiniteLossError,) as e:
    # Errors the user fixes from the command line (every trainer raises the same ones):
    # one clear line, no traceback.
    fail(f"error: {type(e).__name__}: {e}", now=checkpoint.is_out_of_space(e))
  except Exception as e:  # pylint: disable=broad-except
    if not checkpoint.is_out_of_space(e):
      raise  # A bug: the traceback is the report.
    # A full disk under any writer (TensorBoard events, orbax, config.json): one line.
    fail(f"error: no space left on device while writing {FLAGS.workdir} ({type(e).__name__}): "
         "the newest complete checkpoint there is where a restart resumes; free space and run "
         "again", now=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
