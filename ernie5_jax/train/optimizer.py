"""AdamW with a warmup-stable-decay (WSD) schedule, global-norm clipping and a decay mask.

WSD (Hu et al., MiniCPM, arXiv 2404.06395, Sec. 4): linear warmup from 0 to the
peak over `warmup_steps`, constant at the peak, then a LINEAR decay to
`min_lr_ratio * peak` over the final `decay_fraction * num_steps` steps (linear
rather than cosine: the MiniCPM ablations find the decay shape matters little,
and a linear ramp is easy to read off a curve).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters whose path contains one of these names get no weight decay.
_NO_DECAY_NAMES = ("norm", "scale", "bias")


def wsd_schedule(*, peak: float, num_steps: int, warmup_steps: int, decay_fraction: float,
                 min_lr_ratio: float) -> optax.Schedule:
  """Warmup-stable-decay: 0 -> peak (linear), peak, then linear to min_lr_ratio * peak."""
  decay_steps = int(round(decay_fraction * num_steps))
  stable_steps = max(num_steps - warmup_steps - decay_steps, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
       optax.constant_schedule(peak),
       optax.linear_schedule(peak, peak * min_lr_ratio, max(decay_steps, 1))],
      boundaries=[warmup_steps, warmup_steps + stable_steps])


def decay_mask(params):
  """True for the leaves that get weight decay: matrices, not norms, scales or biases."""
  def wants_decay(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    return not any(n in name for name in names for n in _NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by min(1, max_norm / global norm): optax's clip as one scalar factor.

  The same function as optax.clip_by_global_norm (which selects g or g / norm * max_norm
  per leaf), written so XLA:CPU fuses the factor into the Adam moments' loops: optax's
  select is materialised as a second copy of every gradient that both moments then read,
  4 of the 16 passes over the parameters in benchmarks/presets.py's "medium" step.
  """
  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / norm)  # [] ; a zero norm gives inf -> 1
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def create_optimizer(config: ml_collections.ConfigDict, *, num_steps: int | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (clip -> AdamW transformation, learning-rate schedule) for config.optimizer.

  num_steps: the schedule's length in optimizer steps (default config.train.num_steps).
  """
  o = config.optimizer
  num_steps = config.train.num_steps if num_steps is None else num_steps
  schedule = wsd_schedule(peak=o.learning_rate, num_steps=num_steps,
                          warmup_steps=o.warmup_steps, decay_fraction=o.decay_fraction,
                          min_lr_ratio=o.min_lr_ratio)
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=decay_mask)
  if o.grad_clip_norm > 0:
    return optax.chain(clip_by_global_norm(o.grad_clip_norm), adamw), schedule
  return adamw, schedule
