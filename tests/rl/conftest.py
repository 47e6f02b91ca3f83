"""Fixtures shared by the RL tests."""

import pytest


@pytest.fixture(scope="module")
def config(digits_config):
  """tests/conftest.py's digits_config, under the name the RL tests use."""
  return digits_config
