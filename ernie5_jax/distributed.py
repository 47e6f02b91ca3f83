"""Multi-process start-up: `jax.distributed.initialize` when the config or the environment asks.

One process runs per host (TPU VM worker, GPU node, or one per GPU under SLURM); after
initialisation `jax.devices()` lists every device of every process, the mesh
(ernie5_jax/sharding.py) spans them all, each process reads its own rows of the global
batch (input_pipeline: process_index / process_count) and orbax writes the global arrays
of a checkpoint together. It must run before anything touches a device (main.py calls it
first). Launch recipes: experiments/pod_tpu_v5p.py, experiments/gpu_cluster.py.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from absl import logging

from ernie5_jax.config import DISTRIBUTED_INIT, ConfigError

# Environment variables of launchers that start several processes of one job.
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_TASK_COUNT_ENVS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def skip_absent_tpu(environ: Mapping[str, str] | None = None) -> str | None:
  """On a host without TPU chips, keeps JAX from probing for one; returns the platforms set.

  With libtpu installed (the test extra, for --mode=compile), JAX's start-up tries to open
  a TPU on every host and libtpu logs errors on stderr where there is none ("could not
  determine TPU accelerator type", "unexpected worker hostname"). Without TPU chips on the
  PCI bus (jax's own check) the platforms are set to the others; an explicit JAX_PLATFORMS
  or JAX_FORCE_TPU_INIT is left alone. Call before anything touches a device.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in environ:
    return None
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return None
  platforms = "cuda,cpu" if hardware_utils.has_visible_nvidia_gpu() else "cpu"
  jax.config.update("jax_platforms", platforms)
  return platforms


def _field(dist_cfg: Any, name: str, default: Any) -> Any:
  return default if dist_cfg is None else dist_cfg.get(name, default)


def should_initialize(dist_cfg: Any, environ: Mapping[str, str] | None = None) -> bool:
  """Whether to call jax.distributed.initialize for config.distributed (None: "auto").

  "auto": yes when a coordinator is named (config or JAX_COORDINATOR_ADDRESS) or a
  launcher started more than one task (SLURM_NTASKS, OMPI_COMM_WORLD_SIZE > 1).
  """
  environ = os.environ if environ is None else environ
  mode = _field(dist_cfg, "initialize", "auto")
  if mode not in DISTRIBUTED_INIT:
    raise ConfigError(f"config.distributed.initialize={mode!r} is not accepted: expected one "
                      f"of {DISTRIBUTED_INIT}")
  if mode != "auto":
    return mode == "always"
  if _field(dist_cfg, "coordinator_address", "") or environ.get(_COORDINATOR_ENV):
    return True
  return any(int(environ.get(name, "1") or 1) > 1 for name in _TASK_COUNT_ENVS)


def initialize_kwargs(dist_cfg: Any) -> dict[str, Any]:
  """jax.distributed.initialize arguments set in the config; the rest JAX auto-detects."""
  kwargs = {}
  if address := _field(dist_cfg, "coordinator_address", ""):
    kwargs["coordinator_address"] = address
  if (count := _field(dist_cfg, "num_processes", 0)) > 0:
    kwargs["num_processes"] = count
  if (index := _field(dist_cfg, "process_id", -1)) >= 0:
    kwargs["process_id"] = index
  return kwargs


def maybe_initialize(config: Any, environ: Mapping[str, str] | None = None) -> bool:
  """jax.distributed.initialize if should_initialize(config.distributed); returns whether it ran."""
  dist_cfg = config.get("distributed") if config is not None else None
  if not should_initialize(dist_cfg, environ):
    return False
  kwargs = initialize_kwargs(dist_cfg)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised (%s): process %d of %d, %d local / %d global "
               "devices.", kwargs or "auto-detected", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
