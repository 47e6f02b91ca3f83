"""The README's CLI commands, run exactly as written (relative paths included), in order.

They run in a scratch directory laid out like the checkout (`.venv` and `experiments`
linked), so that the relative `workdirs/...` paths they write do not touch the checkout's
own. The install and pytest commands are what CI itself runs (.ci/run), so they are not
repeated here.
"""

import json
import os
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = "./setup.sh && "
PREFIX = ".venv/bin/python -m ernie5_jax.main"


def _lines() -> list[str]:
  text = re.sub(r"\\\n\s*", "", (REPO / "README.md").read_text())  # Continuations joined.
  return [line.strip() for line in text.splitlines()]


def readme_commands() -> list[str]:
  """The README's `python -m ernie5_jax.main` command lines (after setup or not), in order."""
  return [line for line in _lines() if line.removeprefix(SETUP).startswith(PREFIX)]


def test_the_readme_gives_two_setup_commands_and_ci_runs_the_second():
  setup = [line for line in _lines() if line.startswith(SETUP)]
  assert setup == [SETUP + PREFIX + " --config=experiments/tiny.py --workdir=workdirs/tiny",
                   SETUP + ".venv/bin/python -m pytest -n 2 -q"]
  assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == setup[1]


def test_the_readme_shows_the_main_job_and_its_follow_ups():
  modes = [re.search(r"--mode=(\w+)", c) for c in readme_commands()]
  assert [m.group(1) if m else "train" for m in modes] == [
      "train", "eval", "export", "generate", "compile", "import", "train", "eval", "export"]


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path_factory):
  scratch = tmp_path_factory.mktemp("readme")
  # tests/: the ERNIE 4.5 fixture imported; setup.sh (+ setup.py, its stamp): skipped, as set up.
  for name in (".venv", "experiments", "tests", "setup.sh", "setup.py"):
    (scratch / name).symlink_to(REPO / name)
  env = dict(os.environ, ERNIE5_DATA_DIR=str(tmp_path_factory.getbasetemp() / "shared_data"))
  env.pop("JAX_PLATFORMS", None)  # As a user's shell has it: main.py keeps JAX off the TPU probe.
  for command in readme_commands():
    proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=scratch, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert "libtpu" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr, command
  work = scratch / "workdirs"
  assert (work / "tiny" / "checkpoints" / "300" / "model").is_dir()
  # The watching eval job, started after training here: the final step, then it stops.
  report = json.loads((work / "tiny" / "eval" / "300" / "family_report.json").read_text())
  assert report["step"] == 300
  assert list((work / "tiny" / "eval").glob("events.out.tfevents.*"))
  assert (work / "tiny_2_4_1" / "model").is_dir()
  assert (work / "tiny" / "samples" / "report.json").is_file()
  compiled = json.loads((work / "compile_tiny" / "compile_report.json").read_text())
  train = compiled["programs"][0]
  assert compiled["topology"] == "v5p:2x2x1" and train["fits"]
  assert train["kernels"]["mosaic_kernels"] > 0
  # ERNIE 4.5: imported, trained elastically from it, evaluated, a sub-model exported as HF.
  assert (work / "ernie45" / "model").is_dir()
  assert (work / "ernie45_elastic" / "checkpoints" / "4" / "model").is_dir()
  assert json.loads((work / "ernie45_elastic" / "eval" / "family_report.json").read_text())
  hf = json.loads((work / "ernie45_2_4_1_hf" / "config.json").read_text())
  assert (hf["num_hidden_layers"], hf["moe_num_experts"], hf["moe_k"]) == (2, 4, 1)
  assert (work / "ernie45_2_4_1_hf" / "model.safetensors").is_file()
