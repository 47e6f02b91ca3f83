"""End-to-end tests of the CLI: `python -m ernie5_jax.main` in subprocesses, real Decoder;
and main's one-line errors for every trainer, in process."""

import importlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
# The tiny shape of tests/train/tiny_train_config.py: d_model 32, 1 dense + 1 MoE layer, 4
# experts; on experiments/tiny.py's embedded multimodal data (the tiny build; vocabulary
# from the data) with the full objective.
TINY_FLAGS = [
    "--config=experiments/tiny.py", "--config.data.dataset=digits_multimodal/tiny",
    "--config.model.d_model=32", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
    "--config.model.rope_sections=(4,2,2)", "--config.model.num_layers=2",
    "--config.model.num_dense_layers=1", "--config.model.num_experts=4",
    "--config.model.num_shared_experts=0", "--config.model.expert_hidden=16",
    "--config.model.dense_hidden=64", "--config.data.seq_len=16",
    "--config.data.global_batch_size=4", "--config.optimizer.warmup_steps=2",
    f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
    "--config.train.log_every=4",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment; the runs of one test share a persistent compilation cache."""
  cache = tmp_path_factory.mktemp("jax_cache")
  data = tmp_path_factory.getbasetemp() / "shared_data"  # Built by the first run that needs it.
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", ERNIE5_DATA_DIR=str(data))


def _command(workdir, *extra):
  return [sys.executable, "-m", "ernie5_jax.main", *TINY_FLAGS, f"--workdir={workdir}", *extra]


def _run(env, workdir, *extra, check=True):
  proc = subprocess.run(_command(workdir, *extra), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def _committed_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
  return sorted(int(n) for n in names if n.isdigit())  # tmp dirs carry a suffix


def _model_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "model")
  return ocp.StandardCheckpointer().restore(path)


def _mtimes(workdir):
  return {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s)))
          for s in _committed_steps(workdir)}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.slow
def test_run_sigkill_resume_and_rerun(env, tmp_path):
  """One test, so the uninterrupted reference run is made once whatever the xdist split."""
  # 1. An uninterrupted run: progress, metrics, TensorBoard events, checkpoints.
  reference = str(tmp_path / "reference")
  log = _run(env, reference).stderr
  assert _committed_steps(reference) == [32, 36, 40]  # keep_checkpoints=3
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(reference))
  assert re.search(r"steps/s, 100.0% \(40/40\)", log)
  assert "perf/tokens_per_sec" in log and "router/load_imbalance" in log
  assert "Initialised a new model" in log and "Finished training at step 40" in log
  losses = [float(x) for x in re.findall(r"\] .*\bce_loss=([0-9.]+)", log)]
  assert len(losses) == NUM_STEPS // 4 and losses[-1] < losses[0]

  # 2. The same run killed with SIGKILL after its first checkpoint, then restarted.
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while not _committed_steps(killed):
      assert proc.poll() is None, "the run ended before its first checkpoint"
      assert time.monotonic() < deadline, "no checkpoint within 240 s"
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert max(_committed_steps(killed)) < NUM_STEPS
  log = _run(env, killed).stderr
  resumed = int(re.search(r"Resumed from the checkpoint at step (\d+)", log).group(1))
  assert 0 < resumed < NUM_STEPS
  logged = [int(x) for x in re.findall(r"\[(\d+)\] .*\bce_loss=", log)]
  assert logged and min(logged) > resumed  # no step before the checkpoint is trained again
  assert f"Finished training at step {NUM_STEPS}" in log
  # Same final parameters (and router biases) as the uninterrupted run.
  want = _flat(_model_params(reference, NUM_STEPS))
  got = _flat(_model_params(killed, NUM_STEPS))
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=0, atol=1e-6,
                               err_msg=path)

  # 3. Running the finished workdir again resumes at step 40 and trains nothing.
  mtimes = _mtimes(reference)
  log = _run(env, reference).stderr
  assert "Resumed from the checkpoint at step 40" in log
  assert ("Nothing to do: the checkpoint at step 40 already reached "
          "config.train.num_steps=40") in log
  assert "Initialised a new model" not in log and "ce_loss" not in log
  assert _mtimes(reference) == mtimes


def test_unwritable_workdir_is_a_clear_error(env, tmp_path):
  (tmp_path / "file").write_text("")
  proc = _run(env, tmp_path / "file" / "run", check=False)
  assert proc.returncode == 2
  assert re.search(r"error: WorkdirError: --workdir=.*file/run' is not accepted: expected a "
                   r"directory this process can create and write", proc.stderr)
  assert "Traceback" not in proc.stderr


def test_unknown_mode_lists_accepted_modes(env, tmp_path):
  proc = _run(env, tmp_path, "--mode=predict", check=False)
  assert proc.returncode == 2
  assert re.search(r"flag --mode=predict: value should be one of <train\|eval\|export[|>]",
                   proc.stderr)


@pytest.mark.parametrize("mode, config, module, run", [
    ("train", "experiments/tiny.py", "ernie5_jax.train.loop", "train_and_evaluate"),
    ("train", "experiments/m2cp_shapes.py", "ernie5_jax.m2cp.train", "train_and_evaluate"),
    ("rl", "experiments/rl_digits.py", "ernie5_jax.rl.train", "train_rl"),
])
def test_non_finite_loss_is_one_line_for_every_trainer(mode, config, module, run, tmp_path, capsys,
                                                       monkeypatch):
  """Pre-training, M2CP and RL raise train/metrics.NonFiniteLossError; main prints one line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax import main  # pylint: disable=g-import-not-at-top
  from ernie5_jax.train import metrics  # pylint: disable=g-import-not-at-top
  message = ("non-finite loss (nan) at step 3: stopping without saving this state; the last "
             "good checkpoint (step 2) in /w/checkpoints is kept. Lower "
             "config.optimizer.learning_rate or check the data.")

  def diverge(config, workdir):
    raise metrics.NonFiniteLossError(message)

  monkeypatch.setattr(importlib.import_module(module), run, diverge)
  # TF may already hold its devices in this process (main hides GPUs from it at start-up).
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda *args, **kwargs: None)
  main.parse_flags(["main", f"--config={os.path.join(REPO, config)}", f"--workdir={tmp_path}",
                    f"--mode={mode}"])
  try:
    with pytest.raises(SystemExit) as info:
      main.main(["main"])
  finally:
    main.FLAGS.unparse_flags()
  assert info.value.code == main.USAGE_ERROR == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"error: NonFiniteLossError: {message}")


def _main_with(monkeypatch, error, *, workdir, config="experiments/tiny.py"):
  """Runs main.main with the LM trainer replaced by one that raises `error`; SystemExit info."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ernie5_jax import main  # pylint: disable=g-import-not-at-top

  def fails(config, workdir):
    raise error
  monkeypatch.setattr(importlib.import_module("ernie5_jax.train.loop"), "train_and_evaluate",
                      fails)
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda *args, **kwargs: None)
  monkeypatch.setattr(main.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
  main.parse_flags(["main", f"--config={os.path.join(REPO, config)}", f"--workdir={workdir}"])
  try:
    with pytest.raises(SystemExit) as info:
      main.main(["main"])
  finally:
    main.FLAGS.unparse_flags()
  return info.value.code


def _user_error_cases():
  import errno  # pylint: disable=g-import-not-at-top
  from ernie5_jax import config as config_lib, store  # pylint: disable=g-import-not-at-top
  from ernie5_jax.input_pipeline import records  # pylint: disable=g-import-not-at-top
  from ernie5_jax.train import workdir  # pylint: disable=g-import-not-at-top
  full = OSError(errno.ENOSPC, "No space left on device")
  return [
      (config_lib.ConfigError("config.mesh.data=2 is not accepted: 1 device"),
       "error: ConfigError: config.mesh.data=2 is not accepted: 1 device"),
      (records.DataError("corrupt or truncated shard x record 3"),
       "error: DataError: corrupt or truncated shard x record 3"),
      (store.CheckpointCorruptError("no checkpoint in /w/checkpoints can be read"),
       "error: CheckpointCorruptError: no checkpoint in /w/checkpoints can be read"),
      (workdir.WorkdirBusyError("--workdir='/w' is in use by another run"),
       "error: WorkdirBusyError: --workdir='/w' is in use by another run"),
      (RuntimeError("a bug"), None),
      (full, "error: no space left on device while writing {workdir} (OSError): the newest "
             "complete checkpoint there is where a restart resumes; free space and run again"),
  ]


def test_user_errors_raised_inside_a_trainer_end_in_one_line_with_status_2(capsys, monkeypatch,
                                                                          tmp_path):
  for error, line in _user_error_cases():
    if line is None:  # A bug, not bad input: its traceback is the report.
      with pytest.raises(RuntimeError):
        _main_with(monkeypatch, error, workdir=tmp_path)
      continue
    assert _main_with(monkeypatch, error, workdir=tmp_path) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line.format(workdir=tmp_path)


@pytest.mark.parametrize("text, line", [
    (None, "error: --config={path}: no such file '{path}' (relative to {cwd}): expected an "
           "experiment file, e.g. experiments/tiny.py"),
    ("def get_config(:\n", "error: --config={path}: {path}, line 1: SyntaxError: invalid syntax"),
    ("import ml_collections\n\ndef get_config():\n  return 1 / 0\n",
     "error: --config={path}: {path}, line 4: ZeroDivisionError: division by zero"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_line(text, line, tmp_path, capsys):
  from ernie5_jax import main  # pylint: disable=g-import-not-at-top
  path = tmp_path / "exp.py"
  if text is not None:
    path.write_text(text)
  try:
    with pytest.raises(SystemExit) as info:
      main.parse_flags(["main", f"--config={path}", f"--workdir={tmp_path}"])
  finally:
    main.FLAGS.unparse_flags()
  assert info.value.code == 2
  assert capsys.readouterr().err.strip() == line.format(path=path, cwd=os.getcwd())
