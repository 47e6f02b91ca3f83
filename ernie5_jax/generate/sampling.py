"""Token sampling: greedy, temperature and nucleus (top-p), restricted to an id range.

Nucleus sampling after Holtzman et al. 2019 (arXiv 1904.09751, Sec. 3.1): keep the
smallest set of most likely ids whose probability mass reaches top_p, renormalise,
sample. Decoding a modality samples only from that modality's id range (e.g. the
codebook of the image scale being generated), which is where training put its targets.

`log_probs` is the distribution `sample` draws from (range, temperature, top-p; greedy:
probability 1 at the argmax), so an RL rollout records the behaviour policy's
log-probabilities, not the plain model's (rl/rollout.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy (argmax); top_p 1 = no nucleus cut. Traced: no recompiles."""
  temperature: jax.Array | float = 0.0
  top_p: jax.Array | float = 1.0

  def __post_init__(self):
    t, p = self.temperature, self.top_p
    if isinstance(t, (int, float)) and t < 0:
      raise ValueError(f"temperature={t} is not accepted: expected >= 0 (0 = greedy)")
    if isinstance(p, (int, float)) and not 0 < p <= 1:
      raise ValueError(f"top_p={p} is not accepted: expected 0 < top_p <= 1")


GREEDY = Sampling()


def restrict(logits: jax.Array, lo: jax.Array | int, hi: jax.Array | int) -> jax.Array:
  """Sets logits [..., V] outside ids [lo, hi) to -inf (float32); lo, hi: [] or [...]."""
  ids = jnp.arange(logits.shape[-1])
  lo, hi = jnp.asarray(lo)[..., None], jnp.asarray(hi)[..., None]
  return jnp.where((ids >= lo) & (ids < hi), logits.astype(jnp.float32), -jnp.inf)


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Keeps the nucleus of logits [..., V]: ids whose higher-ranked mass is below top_p.

  The most likely id is always kept; ids tied with the smallest kept logit are kept too.
  """
  desc = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., V] descending
  probs = jax.nn.softmax(desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # Mass of strictly higher-ranked ids.
  kept = jnp.where(mass_before < top_p, desc, jnp.inf)
  cutoff = jnp.min(kept, axis=-1, keepdims=True)  # Smallest kept logit.
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _scaled(restricted: jax.Array, sampling: Sampling) -> jax.Array:
  """The logits [..., V] sampling draws from: / temperature, then the top-p nucleus."""
  temperature = jnp.maximum(jnp.asarray(sampling.temperature, jnp.float32), 1e-6)
  scaled = restricted / temperature
  # top_p = 1 keeps every id: the float32 cumsum can reach 1 before the tail and cut it.
  return jnp.where(jnp.asarray(sampling.top_p) < 1, top_p_filter(scaled, sampling.top_p),
                   scaled)


def log_probs(logits: jax.Array, sampling: Sampling, *, lo: jax.Array | int = 0,
              hi: jax.Array | int | None = None) -> jax.Array:
  """log p [..., V] (float32) of the distribution `sample` draws ids of logits [..., V] from.

  Greedy (temperature 0): 0 at the argmax of the range, -inf elsewhere.
  """
  hi = logits.shape[-1] if hi is None else hi
  restricted = restrict(logits, lo, hi)
  drawn = jax.nn.log_softmax(_scaled(restricted, sampling), axis=-1)
  ids = jnp.arange(logits.shape[-1])
  greedy = jnp.where(ids == jnp.argmax(restricted, axis=-1, keepdims=True), 0.0, -jnp.inf)
  return jnp.where(jnp.asarray(sampling.temperature) > 0, drawn, greedy)


def token_log_probs(logits: jax.Array, ids: jax.Array, sampling: Sampling, *,
                    lo: jax.Array | int = 0, hi: jax.Array | int | None = None) -> jax.Array:
  """log p(ids) [...] under the distribution `sample` draws from (logits [..., V])."""
  logp = log_probs(logits, sampling, lo=lo, hi=hi)
  return jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling, *,
           lo: jax.Array | int = 0, hi: jax.Array | int | None = None) -> jax.Array:
  """Draws one id per row of logits [..., V] within [lo, hi) -> [...] int32."""
  hi = logits.shape[-1] if hi is None else hi
  logits = restrict(logits, lo, hi)
  temperature = jnp.asarray(sampling.temperature, jnp.float32)

  def drawn(logits):
    return jax.random.categorical(rng, _scaled(logits, sampling), axis=-1).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # A traced switch (no recompile between greedy and sampling); greedy skips the sort.
  return jax.lax.cond(temperature > 0, drawn, greedy, logits)
