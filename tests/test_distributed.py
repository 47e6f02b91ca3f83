"""Tests of ernie5_jax/distributed.py: when and with what jax.distributed is initialised."""

import ml_collections
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import distributed


def _dist(**fields):
  d = config_lib.default_config().distributed
  d.update(fields)
  return d


@pytest.mark.parametrize("fields, environ, expected", [
    ({}, {}, False),
    ({}, {"JAX_COORDINATOR_ADDRESS": "host0:1234"}, True),
    ({}, {"SLURM_NTASKS": "8"}, True),
    ({}, {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({}, {"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"coordinator_address": "host0:1234"}, {}, True),
    ({"initialize": "always"}, {}, True),
    ({"initialize": "never"}, {"SLURM_NTASKS": "8"}, False),
])
def test_should_initialize(fields, environ, expected):
  assert distributed.should_initialize(_dist(**fields), environ) is expected


def test_initialize_kwargs_pass_only_what_the_config_sets():
  assert distributed.initialize_kwargs(_dist()) == {}
  assert distributed.initialize_kwargs(_dist(coordinator_address="h:1", num_processes=4,
                                             process_id=3)) == dict(
      coordinator_address="h:1", num_processes=4, process_id=3)


def test_a_config_without_the_section_follows_the_environment():
  other_family = ml_collections.ConfigDict({"trainer": "m2cp"})
  assert distributed.maybe_initialize(other_family, environ={}) is False
  with pytest.raises(config_lib.ConfigError, match=r"distributed.initialize='maybe'"):
    distributed.should_initialize(_dist(initialize="maybe"), {})
