"""The train state: the model split into (static graphdef, parameters, other variables).

Shared by every trainer (pre-training, M2CP, RL): the model comes from a factory
(`create`), whatever its family. It is `nnx.split(model, nnx.Param, ...)`: gradients
and the optimizer see only the nnx.Param leaves; everything else (RouterBias, M2CP's
prototypes, ...) rides along in `rest` and is updated by the train step without gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree (donated to the train step)."""
  step: jax.Array  # [] int32: optimizer steps completed.
  params: nnx.State  # nnx.Param variables.
  rest: nnx.State  # Non-trainable variables (RouterBias, ...).
  opt_state: optax.OptState

  def model_state(self) -> nnx.State:
    """The full model state (params + rest), as nnx.state(model) would give it."""
    return nnx.State.merge(self.params, self.rest)

  def to_checkpoint(self) -> dict[str, Any]:
    """The {'model', 'optimizer', 'step'} pytrees written to a checkpoint."""
    return {"model": self.model_state(), "optimizer": self.opt_state, "step": self.step}

  @classmethod
  def from_checkpoint(cls, items: dict[str, Any]) -> TrainState:
    """Inverse of to_checkpoint."""
    params, rest = items["model"].split(nnx.Param, ...)
    return cls(step=jnp.asarray(items["step"], jnp.int32), params=params, rest=rest,
               opt_state=items["optimizer"])


def new_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  """Step 0, the model's weights, a fresh optimizer state."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                    opt_state=tx.init(params))


def abstract_train_state(create: Callable[[], nnx.Module], tx: optax.GradientTransformation
                         ) -> tuple[nnx.GraphDef, TrainState]:
  """Returns (graphdef, TrainState of jax.ShapeDtypeStruct leaves); computes nothing.

  create: builds the model, any family's (`lambda: create_model(config)` for the decoder).
  """
  graphdef, params, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              rest=rest, opt_state=jax.eval_shape(tx.init, params))


def init_train_state(create: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                     *, sharding: jax.sharding.Sharding | None = None
                     ) -> tuple[nnx.GraphDef, TrainState]:
  """Returns (graphdef, new TrainState of create()), made inside one jit, placed per sharding."""
  graphdef, _ = abstract_train_state(create, tx)
  placement = {} if sharding is None else {"out_shardings": sharding}
  # Init runs once: on CPU, XLA's backend optimisations cost more compile time (~3x for the
  # tiny model) than they save at run time.
  if jax.default_backend() == "cpu":
    placement["compiler_options"] = {"xla_backend_optimization_level": 0}
  init = jax.jit(lambda: new_train_state(create(), tx), **placement)
  return graphdef, init()


def num_params(params: Any) -> int:
  """Total number of parameter elements in a pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
