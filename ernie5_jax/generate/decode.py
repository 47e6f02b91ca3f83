"""The jitted decode steps: the Decoder's own forward pass through a KV cache, plus sampling.

Each step runs `Decoder.hidden_states(..., cache=)` (model/decoder.py, model/kv_cache.py):
T new positions computed against everything already in the cache. T = 1 is next-token
decoding; T = s * s is one image scale (one group, bidirectional inside, as training sees
it); T = the prompt length is prefill.

`CachedDecoder` jits one step (forward + output head + sampling) per input length:
  out, cache = dec.step(cache, inputs, rng, sampling, lo=.., hi=..)          any T
  tokens, cache = dec.text_step(cache, tokens, positions, rng, sampling, ..)   T = 1
  codes = dec.audio_frame(out.hidden, out.tokens, rng, sampling, lo=..)      levels 2..K
The same compiled step serves every position (static cache shape; the slot index,
the sampling parameters and the id range are traced). `dec.traces` counts traces
(= compiles) per function, input shape and cache length. An audio frame is level 1
sampled by a step (within the audio range), then levels 2..K one after another from
the audio heads (model/heads.py), each conditioned on the levels sampled before it.

Every forward also returns the expert ids each MoE layer chose for the T positions fed,
[L_moe, batch, T, top_k] int32 (`StepOutput.expert_ids`): the routing record that RL
training replays (rl/rollout.py; model/decoder.py routing_replay).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie5_jax.generate import sampling as sampling_lib
from ernie5_jax.generate.sampling import GREEDY, Sampling
from ernie5_jax.model import decoder as decoder_lib
from ernie5_jax.model import kv_cache as cache_lib
from ernie5_jax.ops import backend as backend_lib
from ernie5_jax.model.elastic import ElasticMasks
from ernie5_jax.model.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
  """T new positions per row, fields as in the unified sequence (input_pipeline/sequence.py)."""
  tokens: jax.Array  # [batch, T] int32
  positions: jax.Array  # [batch, T, 3] int32 (t, h, w)
  segment_ids: jax.Array  # [batch, T] int32 (0 = left padding, 1 = the document)
  group_ids: jax.Array  # [batch, T] int32
  audio_codes: jax.Array  # [batch, T, K] int32 raw codec codes of audio frames, -1 elsewhere

  @property
  def length(self) -> int:
    """T."""
    return self.tokens.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
  """What one decode step returns for its T positions."""
  tokens: jax.Array  # [batch, T] int32 sampled next ids (within the step's id range)
  logits: jax.Array  # [batch, T, vocab] float32
  hidden: jax.Array  # [batch, T, embed] final normed hidden state (the audio heads read it)
  expert_ids: jax.Array  # [L_moe, batch, T, top_k] int32 experts each MoE layer routed to


def sample_audio_levels(model: nnx.Module, hidden: jax.Array, level1_tokens: jax.Array,
                        level1_codes: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Codes [batch, T, K] of a frame: level 1 given, levels 2..K sampled from the audio heads.

  hidden [batch, T, embed] is the backbone's final hidden state where level 1 was
  predicted, level1_tokens [batch, T] its vocabulary ids, level1_codes [batch, T] its raw
  codes. Level k's head reads only levels < k (model/heads.py), so calling the
  teacher-forced heads with the levels sampled so far (-1 = not yet) gives level k exactly.
  """
  if model.audio is None:
    return level1_codes[..., None]
  levels = model.audio.levels
  codes = jnp.full(level1_codes.shape + (levels,), -1, jnp.int32).at[..., 0].set(level1_codes)
  for k, key in zip(range(1, levels), jax.random.split(rng, levels - 1)):
    level_logits = model.audio_logits(hidden, level1_tokens, codes)  # [B, T, K - 1, codebook]
    codes = codes.at[..., k].set(sampling_lib.sample(key, level_logits[..., k - 1, :], sampling))
  return codes


class CachedDecoder:
  """Jitted cached decode steps of one model (its state is captured at construction; `load`
  swaps in another state of the same graph).

  elastic: optional ElasticMasks (model/elastic.py masks_for): every step runs that
  sub-model of the model's parameters (skipped layers, masked experts, its top-k).
  """

  def __init__(self, model: nnx.Module, *, elastic: ElasticMasks | None = None):
    self.unroll = backend_lib.target_platform() == "cpu"  # No per-step copies of stacked weights.
    self.graphdef, self.state = nnx.split(self._as_decoded(model))
    self.elastic = elastic
    self.spec = cache_lib.cache_spec(model)
    self.audio_levels = model.audio.levels if model.audio is not None else 1
    self.vocab_size = int(model.embed.table.shape[0])
    self.traces: collections.Counter = collections.Counter()
    self._step = jax.jit(self._traced_step, donate_argnames=("cache",))
    self._text_step = jax.jit(self._traced_text_step, donate_argnames=("cache",))
    self._audio_frame = jax.jit(self._traced_audio_frame)

  def _as_decoded(self, model: nnx.Module) -> nnx.Module:
    """model as the steps run it: on CPU, its scanned layer stacks unrolled (unroll_layers)."""
    return decoder_lib.unroll_layers(model) if self.unroll else model

  def load(self, model: nnx.Module) -> None:
    """Runs the compiled steps on model's weights (a model of the same graph: a later policy)."""
    self.state = nnx.split(self._as_decoded(model))[1]

  def init_cache(self, *, batch: int, max_len: int) -> KVCache:
    """An empty cache for this model."""
    return cache_lib.init_cache(self.spec, batch=batch, max_len=max_len)

  def _run(self, state, cache, inputs, rng, sampling, lo, hi):
    model = nnx.merge(self.graphdef, state)
    hidden, aux = model.hidden_states(inputs.tokens, inputs.positions, inputs.segment_ids,
                                      inputs.group_ids, inputs.audio_codes,
                                      elastic=self.elastic, cache=cache)
    cache, expert_ids = aux["cache"], aux["expert_ids"]
    logits = model.logits(hidden)  # [batch, T, vocab] float32
    tokens = sampling_lib.sample(rng, logits, sampling, lo=lo, hi=hi)  # [batch, T]
    return StepOutput(tokens=tokens, logits=logits, hidden=hidden,
                      expert_ids=expert_ids), cache

  def _traced_step(self, state, cache, inputs, rng, sampling, lo, hi):
    self.traces["step", inputs.tokens.shape, cache.max_len] += 1
    return self._run(state, cache, inputs, rng, sampling, lo, hi)

  def _traced_text_step(self, state, cache, tokens, positions, rng, sampling, lo, hi):
    self.traces["text_step", tokens.shape, cache.max_len] += 1
    batch = tokens.shape[0]
    inputs = StepInputs(
        tokens=tokens[:, None], positions=jnp.broadcast_to(positions[:, None, None], (batch, 1, 3)),
        segment_ids=jnp.ones((batch, 1), jnp.int32), group_ids=jnp.zeros((batch, 1), jnp.int32),
        audio_codes=jnp.full((batch, 1, self.audio_levels), -1, jnp.int32))
    out, cache = self._run(state, cache, inputs, rng, sampling, lo, hi)
    return out.tokens[:, 0], cache

  def _traced_audio_frame(self, state, hidden, tokens, rng, sampling, lo):
    self.traces["audio_frame", tokens.shape] += 1
    model = nnx.merge(self.graphdef, state)
    return sample_audio_levels(model, hidden, tokens, tokens - lo, rng, sampling)

  def step(self, cache: KVCache, inputs: StepInputs, rng: jax.Array,
           sampling: Sampling = GREEDY, *, lo: int = 0, hi: int | None = None
           ) -> tuple[StepOutput, KVCache]:
    """Feeds T positions (prefill, one token, one image scale, one audio frame); samples ids.

    Sampled ids lie in [lo, hi) (default: the whole vocabulary). The cache is donated: use
    the returned one; it must have room (cache.index + T <= max_len: not checked in jit).
    """
    hi = self.vocab_size if hi is None else hi
    return self._step(self.state, cache, inputs, rng, sampling, lo, hi)

  def text_step(self, cache: KVCache, tokens: jax.Array, positions: jax.Array, rng: jax.Array,
                sampling: Sampling = GREEDY, *, lo: int = 0, hi: int | None = None
                ) -> tuple[jax.Array, KVCache]:
    """Feeds one text token per row (tokens [batch] at positions [batch]) -> next ids [batch]."""
    hi = self.vocab_size if hi is None else hi
    return self._text_step(self.state, cache, tokens, positions, rng, sampling, lo, hi)

  def audio_frame(self, hidden: jax.Array, tokens: jax.Array, rng: jax.Array,
                  sampling: Sampling = GREEDY, *, lo: int) -> jax.Array:
    """Completes codec frames: level-1 ids tokens [batch, T] (audio range from lo) sampled at
    hidden [batch, T, embed] -> raw codes [batch, T, K] (levels 2..K from the audio heads)."""
    return self._audio_frame(self.state, hidden, tokens, rng, sampling, lo)


def as_inputs(fields: dict[str, np.ndarray]) -> StepInputs:
  """StepInputs from a dict of numpy arrays (keys = StepInputs fields)."""
  return StepInputs(**{f.name: jnp.asarray(fields[f.name]) for f in dataclasses.fields(StepInputs)})

