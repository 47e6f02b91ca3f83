"""Accelerator chips and named topologies that `--mode=compile` targets from a CPU host.

A topology is "<chip>:<shape>": a TPU slice ("v5p:4x4x4", "v5e:4x4", "v6e:2x2") whose
abstract devices `jax.experimental.topologies` builds with the real TPU compiler (libtpu),
or a GPU count ("h100:16"), which can only be lowered (`platforms=["cuda"]`) without a GPU.

Chip figures are the vendors' public spec sheets, per chip: peak dense bf16 FLOP/s, HBM
capacity and bandwidth, and the chip's interconnect bandwidth (ICI for TPUs, NVLink for
GPUs; one direction summed over links, as the sheets give it):
  TPU v4   cloud.google.com/tpu/docs/v4     275 TFLOP/s, 32 GiB,  1,200 GB/s, ICI 2,400 Gbit/s
  TPU v5e  cloud.google.com/tpu/docs/v5e    197 TFLOP/s, 16 GiB,    819 GB/s, ICI 1,600 Gbit/s
  TPU v5p  cloud.google.com/tpu/docs/v5p    459 TFLOP/s, 95 GiB,  2,765 GB/s, ICI 4,800 Gbit/s
  TPU v6e  cloud.google.com/tpu/docs/v6e    918 TFLOP/s, 32 GiB,  1,640 GB/s, ICI 3,584 Gbit/s
  A100     NVIDIA A100 datasheet (SXM 80GB) 312 TFLOP/s, 80 GB,   2,039 GB/s, NVLink 600 GB/s
  H100     NVIDIA H100 datasheet (SXM)      989 TFLOP/s, 80 GB,   3,350 GB/s, NVLink 900 GB/s
  H200     NVIDIA H200 datasheet (SXM)      989 TFLOP/s, 141 GB,  4,800 GB/s, NVLink 900 GB/s
The HBM sizes are read as GiB for TPUs (what XLA reports as the per-chip limit, to within
1-2%) and as GB for GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from ernie5_jax.config import ConfigError

GIB, GB = 2**30, 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's public figures (module doc)."""
  name: str
  platform: str  # "tpu" or "cuda"
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bytes_per_sec: float
  link_bytes_per_sec: float  # ICI / NVLink
  chip_config: str = "default"  # jax.experimental.topologies chip_config_name (TPU)


CHIPS = {
    "v4": Chip("TPU v4", "tpu", 275e12, 32 * GIB, 1200 * GB, 2400e9 / 8, "megacore"),
    "v5e": Chip("TPU v5e", "tpu", 197e12, 16 * GIB, 819 * GB, 1600e9 / 8),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 95 * GIB, 2765 * GB, 4800e9 / 8),
    "v6e": Chip("TPU v6e", "tpu", 918e12, 32 * GIB, 1640 * GB, 3584e9 / 8),
    "a100": Chip("NVIDIA A100", "cuda", 312e12, 80 * GB, 2039 * GB, 600 * GB),
    "h100": Chip("NVIDIA H100", "cuda", 989e12, 80 * GB, 3350 * GB, 900 * GB),
    "h200": Chip("NVIDIA H200", "cuda", 989e12, 141 * GB, 4800 * GB, 900 * GB),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed --topology: the chip, its shape and the device count."""
  name: str  # as given, e.g. "v5p:4x4x4"
  chip: Chip
  shape: tuple[int, ...]  # TPU: chips per dimension; GPU: (count,)

  @property
  def num_devices(self) -> int:
    """Chips (TPU) or GPUs in the topology."""
    return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
  """'v5p:2x2x2' / 'v5e:4x4' / 'h100:16' -> Topology; a bad name raises ConfigError."""
  accepted = (f"expected '<chip>:<shape>' with chip one of {sorted(CHIPS)}, e.g. 'v5p:2x2x2', "
              "'v5e:4x4' (TPU slices) or 'h100:16' (GPUs)")
  match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name or "")
  if not match or match.group(1) not in CHIPS:
    raise ConfigError(f"--topology={name!r} is not accepted: {accepted}")
  chip = CHIPS[match.group(1)]
  shape = tuple(int(n) for n in match.group(2).split("x"))
  if chip.platform == "cuda" and len(shape) != 1 or min(shape) < 1:
    raise ConfigError(f"--topology={name!r} is not accepted: {accepted}")
  return Topology(name, chip, shape)


def tpu_devices(topology: Topology) -> list:
  """The abstract devices of a TPU slice (libtpu's compiler; no TPU needed)."""
  # Without a TPU VM's metadata, libtpu logs errors for each unknown setting: these are
  # the values of a one-host slice, which only the abstract topology reads.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.name.split(':')[0]}-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  # No chip is opened: several such processes (pytest workers, a benchmark) may load libtpu
  # at once, which its lock file would refuse.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name, chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as e:  # libtpu missing, or a shape this TPU generation does not have.
    raise ConfigError(
        f"--topology={topology.name!r}: libtpu could not build it ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}): install the TPU compiler with "
        "pip install -e '.[test]' (libtpu), and name a slice shape of that generation") from e
  return list(desc.devices)
