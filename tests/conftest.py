"""Fixtures shared by more than one test folder."""

import os

# The suite runs on the CPU: with libtpu installed (the test extra), JAX would otherwise probe
# for a TPU at start-up and libtpu would log errors (main.py does the same per host:
# distributed.skip_absent_tpu). TPU compiles use abstract topologies (tests/aot), unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from ernie5_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from ernie5_jax.model import Decoder  # pylint: disable=g-import-not-at-top


def _numpy_decoder(model_config, seed: int = 0, scale: float = 0.1) -> Decoder:
  """A Decoder with N(0, scale^2) numpy-drawn parameters (no init compile); buffers zero."""
  abstract = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), params)
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)  # e.g. router bias
  return nnx.merge(graphdef, params, rest)


@pytest.fixture(scope="session")
def numpy_decoder():
  """The factory (model_config, seed=0, scale=0.1) -> Decoder with numpy-drawn parameters."""
  return _numpy_decoder


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
  """The default config on the tiny embedded digits build (200 train / 50 test digits)."""
  cfg = config_lib.default_config()
  cfg.data.dataset = "digits_multimodal/tiny"
  cfg.data.data_dir = str(tmp_path_factory.getbasetemp() / "shared_data")
  return cfg
