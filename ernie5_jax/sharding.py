"""Device mesh, logical-axis rules, and the shardings of the train state, batch and activations.

The mesh has four named axes, outermost first (config.mesh):
  data    pure data parallelism: batch rows split, state replicated;
  fsdp    batch rows split and parameters / optimizer state sharded (ZeRO-3: gathered per use);
  expert  batch rows split and routed experts sharded; tokens travel to their experts by
          all-to-all (ops/moe_expert_parallel.py);
  tensor  attention heads, MLP hidden and vocabulary split (Megatron-style; inside a host).
Every parameter carries logical axis names (model/layers.py `param`); the one table
config.mesh.rules maps each name to mesh axes. Activations are constrained by names too
(`constrain`). The whole program stays one jit over global arrays (GSPMD): XLA inserts the
collectives, except the expert all-to-all, which runs inside shard_map.

A `Layout` (mesh + rules + expert-parallel options) is made once by the trainer from the
config; `use_layout` makes it the active one while a step is traced, which switches on the
activation constraints and the expert-parallel MoE dispatch (ops/backend.py). Nothing here
allocates: shardings come from `jax.eval_shape`'d states.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ernie5_jax.config import MESH_AXES, ConfigError, mesh_rule_axes

# Logical names of activations (parameters' names are set where they are created).
BATCH, SEQ, ACT_EMBED = "batch", "seq", "act_embed"
ACT_BSD = (BATCH, SEQ, ACT_EMBED)  # The residual stream [batch, seq, embed].


def rules_table(mesh_cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """config.mesh.rules as {logical name: mesh axes}."""
  return {name: mesh_rule_axes(name, value) for name, value in mesh_cfg.rules.items()}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves config.mesh sizes (one may be -1 = fill) for num_devices; errors name the axis."""
  sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if fill:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes "
          f"({shape}) multiply to {fixed}, which does not divide {num_devices}")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"config.mesh ({shape}) has {fixed} devices, but {num_devices} are "
                      "available: expected sizes whose product is the device count (set one "
                      "axis to -1 to fill)")
  return sizes


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a program is laid out over devices: mesh, logical-axis rules, expert-parallel options."""
  mesh: Mesh | jax.sharding.AbstractMesh  # Abstract: planning only (abstract_layout).
  rules: tuple[tuple[str, tuple[str, ...]], ...]  # (logical name, mesh axes), config order.
  expert_capacity_factor: float = 0.0  # config.mesh.expert_capacity_factor (0 = dropless).
  # The platform the program is compiled for ("cpu", "tpu", "cuda"): the devices' own, or the
  # target of an ahead-of-time compile or export (ernie5_jax/aot); ops/backend.py reads it.
  platform: str | None = None

  @property
  def axis_sizes(self) -> dict[str, int]:
    """{mesh axis: size}."""
    return dict(self.mesh.shape)

  def axes(self, name: str) -> tuple[str, ...]:
    """Mesh axes of logical `name` that have size > 1 (size-1 axes shard nothing)."""
    table = dict(self.rules)
    if name not in table:
      raise ConfigError(f"logical axis {name!r} has no rule in config.mesh.rules: expected one "
                        f"of {sorted(table)} (or add a rule for it)")
    return tuple(a for a in table[name] if self.mesh.shape[a] > 1)

  def size(self, axes: Sequence[str]) -> int:
    """Number of shards of a dimension split over `axes`."""
    return math.prod(self.mesh.shape[a] for a in axes)

  def dividing_axes(self, name: str, dim: int) -> tuple[str, ...]:
    """axes(name) if they divide a dimension of size `dim`, else () (the dimension stays whole)."""
    axes = self.axes(name)
    return axes if dim % self.size(axes) == 0 else ()


def make_layout(config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None, *,
                platform: str | None = None) -> Layout:
  """Builds the device mesh of config.mesh over `devices` (default: all) and its rules.

  platform: what the program is compiled for; default the devices' platform (a CPU host
  compiling for abstract TPU devices gets "tpu"; `jax.export` to another platform names it).
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(config.mesh, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except NotImplementedError:
    # A mesh axis no product of torus axes equals (expert = 8 on a v5p 4x4x4 torus, found by
    # --mode=compile): split a physical axis over two mesh axes instead of failing.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    mesh = Mesh(grid, MESH_AXES, axis_types=auto)
  return _layout(config, mesh, platform or devices[0].platform)


def abstract_layout(config: ml_collections.ConfigDict, num_devices: int) -> Layout:
  """make_layout's layout for num_devices that need not exist (an AbstractMesh): for planning."""
  sizes = mesh_shape(config.mesh, num_devices)
  return _layout(config, jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES),
                                                   MESH_AXES))


def _layout(config: ml_collections.ConfigDict, mesh: Mesh | jax.sharding.AbstractMesh,
            platform: str | None = None) -> Layout:
  table = rules_table(config.mesh)
  layout = Layout(mesh, tuple(table.items()), float(config.mesh.expert_capacity_factor),
                  platform)
  expert_axes = layout.axes("expert") if "expert" in table else ()
  missing = [a for a in expert_axes if a not in layout.axes(BATCH)]
  if missing:  # Expert parallelism exchanges tokens between the shards that split the batch.
    raise ConfigError(
        f"config.mesh.rules.batch={config.mesh.rules.batch!r} is not accepted: routed experts "
        f"are split over {expert_axes} (config.mesh.rules.expert), so the batch must be split "
        f"over {missing} too")
  return layout


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], layout: Layout, *,
                    what: str, strict: bool = True) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry logical `names`.

  A mesh axis already used by an earlier dimension is skipped for later ones (e.g. 'embed'
  -> fsdp,expert shards an expert weight's embed over fsdp only). strict: a dimension that
  its mesh axes do not divide raises ConfigError naming `what`; else it is left unsplit.
  """
  if len(names) != len(shape):
    raise ValueError(f"{what}: logical names {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, (name, size) in enumerate(zip(names, shape)):
    axes = () if name is None else tuple(a for a in layout.axes(name) if a not in used)
    shards = layout.size(axes)
    if size % shards:
      if strict:
        sizes = ", ".join(f"{a}={layout.mesh.shape[a]}" for a in axes)
        raise ConfigError(
            f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by the mesh "
            f"axes {axes} it is split over ({sizes}; config.mesh.rules.{name}): change "
            "config.mesh or the rule")
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _path_str(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(p for p in parts if p != "value")


def tree_shardings(tree: Any, layout: Layout) -> Any:
  """NamedShardings of a (possibly abstract) pytree: Variables by logical names, else replicated.

  The result has tree's structure (Variables hold their sharding), as jit's in/out_shardings
  and orbax restore targets expect; optimizer moments of a parameter (optax states hold
  nnx.Param copies) get that parameter's sharding.
  """
  def one(path, x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      if names:
        spec = logical_to_spec(names, x.shape, layout, what=f"parameter {_path_str(path)}")
        return x.replace(NamedSharding(layout.mesh, spec))
      return x.replace(NamedSharding(layout.mesh, PartitionSpec()))
    return NamedSharding(layout.mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(one, tree,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct leaves of `abstract` carrying `shardings` (orbax restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(layout: Layout, global_batch_size: int) -> NamedSharding:
  """Sharding of every batch array: rows split over the 'batch' rule's mesh axes."""
  axes = layout.axes(BATCH)
  shards = layout.size(axes)
  if global_batch_size % shards:
    sizes = ", ".join(f"{a}={layout.mesh.shape[a]}" for a in axes)
    raise ConfigError(f"config.data.global_batch_size={global_batch_size} is not accepted: "
                      f"expected a multiple of {shards}, the batch shards ({sizes}; "
                      "config.mesh.rules.batch)")
  processes = jax.process_count()
  if processes > 1 and shards % processes:
    raise ConfigError(
        f"config.mesh.rules.batch splits the batch {shards} ways over {processes} processes: "
        "expected a multiple of the process count, so that each process feeds its own rows")
  return NamedSharding(layout.mesh, PartitionSpec(axes or None))


def step_shardings(layout: Layout, state_sharding: Any, data_sharding: NamedSharding
                   ) -> dict[str, Any]:
  """jax.jit keyword arguments of train_step(state, batch) -> (state, metrics)."""
  replicated = NamedSharding(layout.mesh, PartitionSpec())
  return {"in_shardings": (state_sharding, data_sharding),
          "out_shardings": (state_sharding, replicated)}


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays (one call for one or many processes)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# --- the active layout (read while a step is traced) -----------------------------

_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("ernie5_layout",
                                                                         default=None)


@contextlib.contextmanager
def use_layout(layout: Layout | None):
  """Makes `layout` the active one (None: none) for code traced inside the block."""
  token = _ACTIVE.set(layout)
  try:
    yield layout
  finally:
    _ACTIVE.reset(token)


def active_layout() -> Layout | None:
  """The layout of the enclosing `use_layout` block, or None."""
  return _ACTIVE.get()


def under_layout(fn: Callable[..., Any], layout: Layout) -> Callable[..., Any]:
  """fn (typically jitted) called inside use_layout(layout), so its trace sees the layout.

  Wrap a fresh jit: jax.jit caches traces by argument types, not by the active layout, so
  a function already traced without (or with another) layout would keep that trace.
  """
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with use_layout(layout):
      return fn(*args, **kwargs)
  return call


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint of x by logical names under the active layout; x itself if none.

  Activations are hints: a dimension its mesh axes do not divide (a batch of one in
  decoding) is left unsplit instead of raising.
  """
  layout = active_layout()
  if layout is None:
    return x
  spec = logical_to_spec(names, x.shape, layout, what="activation", strict=False)
  return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))
