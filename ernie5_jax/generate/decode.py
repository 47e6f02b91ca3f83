"""The decoder's forward pass through a KV cache, and the jitted decode steps.

`forward_cached` walks the Decoder's own submodules -- embed (+ audio input sum),
Uni-RoPE angles, the dense and MoE BlockStacks (nnx.scan over stacked layers, as in
training), final norm -- with each block's attention swapped for `Attention.decode`,
so T new positions are computed against everything already in the cache. T = 1 is
next-token decoding; T = s * s is one image scale (one group, bidirectional inside,
as training sees it); T = the prompt length is prefill.

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

from ernie5_jax.generate import cache as cache_lib
from ernie5_jax.generate import sampling as sampling_lib
from ernie5_jax.generate.cache import KVCache
from ernie5_jax.generate.sampling import GREEDY, Sampling
from ernie5_jax.model.elastic import ElasticMasks


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


def _block_decode(block, x, angles, cache_k, cache_v, index, mask, keep_i=None,
                  elastic: ElasticMasks | None = None):
  """One decoder Block (model/decoder.py) on new positions, its attention through the cache.

  Returns (x, cache_k, cache_v, expert ids [batch, T, top_k] of an MoE block / None).
  Elastic: keep_i [] bool False skips the block (identity, cache untouched, ids -1) as
  Decoder does; an MoE block routes with elastic's expert mask and top-k.
  """
  def run(x, cache_k, cache_v):
    h, cache_k, cache_v = block.attn.decode(block.attn_norm(x), angles, cache_k, cache_v,
                                            index=index, mask=mask)
    x = x + h
    ids = None
    if block.moe:
      route = {} if elastic is None else dict(
          expert_mask=elastic.expert_mask, top_k_index=elastic.top_k_index,
          top_ks=elastic.top_ks)
      y, stats = block.ffn(block.ffn_norm(x), **route)
      ids = stats["expert_ids"]
    else:
      y = block.ffn(block.ffn_norm(x))
    return (x + y).astype(block.dtype), cache_k, cache_v, ids

  def skip(x, cache_k, cache_v):
    ids = None
    if block.moe:
      ids = jnp.full(x.shape[:2] + (block.top_k,), -1, jnp.int32)  # [batch, T, top_k]
    return x.astype(block.dtype), cache_k, cache_v, ids

  if keep_i is None:
    return run(x, cache_k, cache_v)
  return jax.lax.cond(keep_i, run, skip, x, cache_k, cache_v)


def _stack_decode(stack, x, angles, cache_k, cache_v, index, mask, keep=None,
                  elastic: ElasticMasks | None = None):
  """A BlockStack on new positions; cache_k/v [stack layers, batch, max_len, kv, head_dim].

  keep: optional [stack layers] bool (elastic layer_keep). Returns (x, k, v, expert ids
  [stack layers, batch, T, top_k] of an MoE stack / None).
  """
  if stack.scan:
    xs = {} if keep is None else {"keep": keep}

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0, None, None, None, None),
              out_axes=(nnx.Carry, 0, 0, 0), graph_updates=False)
    def body(h, block, k, v, xs_i, angles, index, mask, elastic):
      return _block_decode(block, h, angles, k, v, index, mask, xs_i.get("keep"), elastic)
    return body(x, stack.layers, cache_k, cache_v, xs, angles, index, mask, elastic)
  ks, vs, ids = [], [], []
  for i, block in enumerate(stack.layers):
    x, k, v, ids_i = _block_decode(block, x, angles, cache_k[i], cache_v[i], index, mask,
                                   None if keep is None else keep[i], elastic)
    ks.append(k)
    vs.append(v)
    ids.append(ids_i)
  return x, jnp.stack(ks), jnp.stack(vs), None if ids[0] is None else jnp.stack(ids)


def forward_cached(model: nnx.Module, cache: KVCache, inputs: StepInputs,
                   elastic: ElasticMasks | None = None
                   ) -> tuple[jax.Array, KVCache, jax.Array]:
  """(final normed hidden [batch, T, embed], the cache holding them, expert ids) of T positions.

  Equals Decoder.hidden_states on the whole sequence (cache slots + new positions) at
  the new positions: same modules, same mask (generate/cache.py). The expert ids
  [L_moe, batch, T, top_k] int32 are the MoE layers' choices there (aux["expert_ids"]).
  elastic: optional sub-model masks (model/elastic.py), as Decoder.__call__'s `elastic`.
  """
  x = model.embed(inputs.tokens)  # [batch, T, embed]
  if model.audio is not None:  # All -1 (non-audio positions) adds exactly 0.
    x = x + model.audio.input_sum(inputs.audio_codes)
  angles = model.rope_angles(inputs.positions)  # [batch, T, head_dim // 2]
  cache = cache_lib.write_ids(cache, inputs.segment_ids, inputs.group_ids)
  mask = cache_lib.slot_mask(cache, inputs.segment_ids, inputs.group_ids)  # [batch, T, max_len]
  ks, vs, start = [], [], 0
  batch, length = inputs.tokens.shape
  expert_ids = jnp.zeros((0, batch, length, model.top_k), jnp.int32)  # No MoE layers.
  for stack in (model.dense_layers, model.moe_layers):
    n = cache_lib.stack_layers(stack)
    if not n:
      continue
    keep = None if elastic is None else elastic.layer_keep[start:start + n]
    x, k, v, ids = _stack_decode(stack, x, angles, cache.k[start:start + n],
                                 cache.v[start:start + n], cache.index, mask, keep, elastic)
    ks.append(k)
    vs.append(v)
    if ids is not None:
      expert_ids = ids
    start += n
  cache = dataclasses.replace(cache, k=jnp.concatenate(ks), v=jnp.concatenate(vs),
                              index=cache.index + inputs.length)
  return model.final_norm(x), cache, expert_ids


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
  """Jitted cached decode steps of one model (its state is captured at construction).

  elastic: optional ElasticMasks (model/elastic.py masks_for): every step runs that
  sub-model of the model's parameters (skipped layers, masked experts, its top-k).
  """

  def __init__(self, model: nnx.Module, *, elastic: ElasticMasks | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.elastic = elastic
    self.spec = cache_lib.cache_spec(model)
    self.audio_levels = model.audio.levels if model.audio is not None else 1
    self.vocab_size = int(model.embed.table.shape[0])
    self.traces: collections.Counter = collections.Counter()
    self._step = jax.jit(self._traced_step, donate_argnames=("cache",))
    self._text_step = jax.jit(self._traced_text_step, donate_argnames=("cache",))
    self._audio_frame = jax.jit(self._traced_audio_frame)

  def init_cache(self, *, batch: int, max_len: int) -> KVCache:
    """An empty cache for this model."""
    return cache_lib.init_cache(self.spec, batch=batch, max_len=max_len)

  def _run(self, state, cache, inputs, rng, sampling, lo, hi):
    model = nnx.merge(self.graphdef, state)
    hidden, cache, expert_ids = forward_cached(model, cache, inputs, self.elastic)
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

