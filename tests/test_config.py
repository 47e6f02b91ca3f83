"""Config errors name the field, the value and what is accepted: validate() and CLI overrides."""

import os
import runpy
import subprocess
import sys

import pytest

from ernie5_jax import config as config_lib
from ernie5_jax.input_pipeline.multimodal import vocabulary_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*overrides):
  """Runs the CLI's flag parsing + validation (they exit before JAX is imported)."""
  proc = subprocess.run(
      [sys.executable, "-m", "ernie5_jax.main", "--config=experiments/tiny.py",
       "--workdir=/nonexistent/never_created", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stderr


def test_default_and_tiny_configs_are_valid():
  config_lib.validate(config_lib.default_config())
  get_config = runpy.run_path("experiments/tiny.py")["get_config"]
  synthetic, multimodal = get_config("synthetic"), get_config()
  for config in (synthetic, multimodal):
    config_lib.validate(config)
  assert synthetic.data.source == "synthetic"
  assert multimodal.data.source == "digits_multimodal"  # the README's default data
  assert multimodal.model.vocab_size == vocabulary_layout(multimodal.data).vocab_size


@pytest.mark.parametrize("field,value,message", [
    ("model.top_k", 9, r"config.model.top_k=9 is not accepted: expected <= model.num_experts=8"),
    ("model.num_heads", 3,
     r"config.model.num_kv_heads=2 is not accepted: expected a divisor of model.num_heads=3"),
    ("model.rope_sections", (8, 4, 2), r"config.model.rope_sections=\(8, 4, 2\) is not "
                                       r"accepted: expected 3 non-negative ints"),
    ("model.rope_sections", (16,), r"config.model.rope_sections=\(16,\)"),
    ("model.moe_dispatch", "magic", r"config.model.moe_dispatch='magic' is not accepted: "
                                    r"expected one of"),
    ("data.global_batch_size", 0, r"config.data.global_batch_size=0 is not accepted"),
    ("data.num_modalities", 3, r"config.data.num_modalities=3 is not accepted: the synthetic "
                               r"source makes 1 \(text\) or 2 \(text, image\)"),
])
def test_validate_names_the_field(field, value, message):
  config = config_lib.default_config()
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_head_width_need_not_equal_d_model():
  config = config_lib.default_config()  # ERNIE 4.5 0.3B: 16 heads * 128 = 2048 != 1024.
  config.model.update(d_model=64, num_heads=4, head_dim=32, rope_sections=(16, 0, 0))
  config_lib.validate(config)  # Accepted: no ConfigError.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ernie5_jax.model import create_model  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: create_model(config))  # Shapes only: nothing compiles.
  wq = [v for p, v in nnx.state(model, nnx.Param).flat_state() if p[-1] == "wq"]
  assert wq and all(w.value.shape[-3:] == (64, 4, 32) for w in wq)  # 4 x 32 = 128 != 64.


def test_cli_unknown_key_names_the_flag_and_suggests_the_field():
  code, err = _cli("--config.model.topk=1")
  assert code == 2
  assert ("error: --config.model.topk is not accepted: config.model has no field 'topk'; "
          "did you mean 'top_k'?") in err
  assert "Traceback" not in err
  code, err = _cli("--config.trian.num_steps=1")
  assert code == 2 and "config has no field 'trian'; did you mean 'train'?" in err


def test_cli_wrong_type_names_the_flag():
  code, err = _cli("--config.model.top_k=two")
  assert code == 2
  assert "flag --config.model.top_k=two: invalid literal for int()" in err
  assert "Traceback" not in err


def test_cli_validation_runs_before_anything_is_built():
  code, err = _cli("--config.model.top_k=9")
  assert code == 2
  assert "error: config.model.top_k=9 is not accepted: expected <= model.num_experts=8" in err
  assert not os.path.exists("/nonexistent/never_created")


def test_parse_arg_types_values_and_names_the_accepted_keys():
  args = config_lib.parse_arg("frac=0.05,seed=1,name=x", frac=0.02, seed=0, steps=0, name="")
  assert (args.frac, args.seed, args.steps, args.name) == (0.05, 1, 0, "x")
  assert isinstance(args.seed, int) and isinstance(args.frac, float)
  with pytest.raises(config_lib.ConfigError, match=r"config arg item 'bad=1' is not accepted: "
                     r"expected key=value with key in \('frac', 'seed'\)"):
    config_lib.parse_arg("bad=1", frac=0.02, seed=0)
  with pytest.raises(config_lib.ConfigError, match=r"config arg seed='x' is not accepted: "
                     r"expected a int"):
    config_lib.parse_arg("seed=x", seed=0)
