"""Fixtures shared by the RL tests."""

import pytest

from ernie5_jax import config as config_lib


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  """The default config on the tiny embedded digits build (200 train / 50 test digits)."""
  cfg = config_lib.default_config()
  cfg.data.dataset = "digits_multimodal/tiny"
  cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "shared_data")
  return cfg
