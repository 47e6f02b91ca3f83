"""Config checks of the data source and the objective: vocabulary agreement, named fields."""

import os
import runpy
import subprocess
import sys

import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(arg=None):
  get_config = runpy.run_path(os.path.join(REPO, "experiments", "tiny.py"))["get_config"]
  return get_config(arg) if arg else get_config()


def test_tiny_trains_on_the_embedded_data_and_agrees_with_its_vocabulary():
  config = _tiny()
  assert config.data.source == "digits_multimodal"
  input_pipeline.validate(config)
  input_pipeline.validate(_tiny("synthetic"))


@pytest.mark.parametrize("field,value,message", [
    ("model.vocab_size", 128, r"config.model.vocab_size=128 is not accepted: expected the "
                              r"data's vocabulary size \d+ \(data.source='digits_multimodal'\)"),
    ("model.audio_levels", 5, r"config.model.audio_levels=5 is not accepted: expected 1..4"),
    ("model.audio_codebook_size", 64,
     r"config.model.audio_codebook_size=64 is not accepted: expected the data's audio "
     r"codebook size 128"),
    ("objective.audio_level_weights", (1.0,),
     r"config.objective.audio_level_weights=\(1.0,\) is not accepted: expected "
     r"model.audio_levels - 1 = 3 weights"),
    ("objective.loss_weighting", "magic",
     r"config.objective.loss_weighting='magic' is not accepted: expected one of "
     r"\('posterior', 'uniform'\)"),
    ("objective.loss_ema_decay", 1.0, r"config.objective.loss_ema_decay=1.0 is not accepted"),
    ("data.source", "imagenet", r"config.data.source='imagenet' is not accepted: expected one "
                                r"of \('synthetic', 'digits_multimodal', 'digits_sft'\), 'tfds:NAME"),
    ("data.image_scales", (2, 4), r"config.data.image_scales=\(2, 4\) is not accepted: expected "
                                  r"a prefix of the image tokenizer's scales \(1, 2, 4, 8\)"),
])
def test_validate_names_the_field(field, value, message):
  config = _tiny()
  group, name = field.split(".")
  config[group][name] = value
  if field == "model.audio_levels":  # Consistent with its level weights: the data check fails.
    config.objective.audio_level_weights = (1.0,) * (value - 1)
  with pytest.raises(config_lib.ConfigError, match=message):
    input_pipeline.validate(config)


def test_unknown_task_lists_the_known_ones():
  config = _tiny()
  config.data.tasks = {"captions": 1.0}
  with pytest.raises(config_lib.ConfigError, match=r"config.data.tasks has task "
                                                   r"name='captions'.*known tasks are"):
    input_pipeline.validate(config)


def test_cli_vocab_override_is_one_clear_line():
  proc = subprocess.run(
      [sys.executable, "-m", "ernie5_jax.main", "--config=experiments/tiny.py",
       "--workdir=/nonexistent/never_created", "--config.model.vocab_size=128"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: config.model.vocab_size=128 is not accepted: expected the data's vocabulary" \
      in proc.stderr
  assert "Traceback" not in proc.stderr
