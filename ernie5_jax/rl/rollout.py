"""The rollout engine: G responses per prompt through the KV cache, with log-probs and routing.

  rolls = rollout(model, prompts, group_size=4, max_new_tokens=8, sampling=Sampling(1.0),
                  rng=jax.random.key(0), dtype=jnp.bfloat16)
  logp, aux = train_logprobs(model, rolls, replay=True)   # the training forward, f32

Row n of a Rollouts is prompt n // G (G = group_size). Each row is ONE sequence laid out as
the training forward reads it, equal slot for slot to the rollout's KV cache
(model/kv_cache.py): the left-padded prompt (segment 0 = pad), then the response.
- text ("text" response_kind): one token per step (generate/decode.py, T = 1), ids sampled
  from the text range; a row ends at its first EOS (kept: the policy learns to stop) or
  after max_new_tokens (complete = False: truncated). Shapes are fixed: S = Lp +
  max_new_tokens; positions after a row's end are padding (segment 0, mask 0).
  targets[s] = tokens[s + 1] (next token); response_mask = 1 at the positions whose target
  was generated (Lp - 1 .. Lp + len - 2).
- image ("image"): next-scale prediction as generate/loops.generate_images: scale k is one
  step of s_k * s_k positions in group next_group + k (inputs SOS or the upsampled codes of
  scale k - 1); the target of a position is the code sampled AT it (the training layout of
  sequence.DocumentWriter.vision), mask 1 on every scale position; S = Lp + sum s_k^2;
  max_new_tokens is not used. response_tokens are the sampled vocabulary ids, scale by
  scale (input_pipeline/verifiable.py image_tokens' layout); complete = True.

infer_logprobs[n, s] = log p_behaviour(targets[n, s]): the log-probability under the
distribution the sampler actually drew from (generate/sampling.log_probs: the id range of
that position, sample_lo[n, s] .. sample_hi[n, s], the temperature and the top-p nucleus),
under the rollout engine (its precision / sub-model), 0 where response_mask is 0. The
training forward (`policy_log_probs`, `logprobs_fn`) takes the policy over the same id
range at the same temperature, so their ratio is the training-inference mismatch of one
policy. Top-p is not applied on the training side (a token outside the training engine's
own nucleus would get probability 0); with rl.top_p < 1 the ratio also carries the
nucleus renormalisation (docs/rl.md).

expert_ids [L_moe, N, S, K]: the experts each MoE layer used at every fed input position
(the prompt from the prefill, then each step), -1 where nothing was fed / after a row's
end / in layers a sub-model skipped (rows with -1 are routed live under replay:
model/router.py). Passing them as `routing_replay` makes training route as the rollout did
(rollout router replay, R3: arXiv 2510.11370; ERNIE 5.0's routing consistency).

dtype (e.g. jnp.bfloat16) rounds the rollout copy's parameters to that precision (compute
stays in the model's dtype), as a lower-precision inference engine would hold them;
float8_e4m3fn quantises each weight matrix with its own scale (max |w| / 448, the format's
largest finite value), the per-tensor FP8 weights of an FP8 inference engine; sub
(an elastic SubModel, or ElasticMasks) runs that sub-model of the parameters (model/elastic.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie5_jax.generate.decode import CachedDecoder, StepInputs
from ernie5_jax.generate import sampling as sampling_lib
from ernie5_jax.generate.sampling import Sampling
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.model import elastic as elastic_lib

RESPONSE_KINDS = ("text", "image")
_FIELDS = ("tokens", "positions", "segment_ids", "group_ids", "audio_codes")


@dataclasses.dataclass
class Rollouts:
  """N = P * G sampled responses (row n of prompt n // G), as full training sequences [N, S]."""
  family: str
  prompt_ids: np.ndarray  # [N] int64
  group_index: np.ndarray  # [N] int32: which prompt of the batch
  tokens: np.ndarray  # [N, S] int32
  positions: np.ndarray  # [N, S, 3] int32
  segment_ids: np.ndarray  # [N, S] int32 (0 = padding)
  group_ids: np.ndarray  # [N, S] int32
  audio_codes: np.ndarray  # [N, S, K_audio] int32
  targets: np.ndarray  # [N, S] int32
  response_mask: np.ndarray  # [N, S] float32: 1 where targets[s] was generated
  infer_logprobs: np.ndarray  # [N, S] float32: rollout engine's log p(targets); 0 off-mask
  expert_ids: np.ndarray  # [L_moe, N, S, top_k] int32 (-1: not recorded)
  response_tokens: list[np.ndarray]  # N x [R_n] generated ids (text: through its EOS)
  complete: np.ndarray  # [N] bool: text reached EOS; image always
  sample_lo: np.ndarray  # [N, S] int32: first id the sampler could draw at s (0 off-mask)
  sample_hi: np.ndarray  # [N, S] int32: one past the last (the vocabulary size off-mask)
  group_size: int = 1

  def fields(self) -> dict[str, np.ndarray]:
    """The model-input fields, targets and sampled id ranges (`logprobs_fn`'s batch_fields)."""
    return {k: getattr(self, k) for k in _FIELDS + ("targets", "sample_lo", "sample_hi")}


# --- the rollout model -------------------------------------------------------------------------
FP8 = jnp.dtype(jnp.float8_e4m3fn)


def quantize(p: jax.Array, dtype) -> jax.Array:
  """p rounded to dtype and back; float8_e4m3fn with a per-tensor scale max|p| / 448."""
  if jnp.dtype(dtype) != FP8:
    return p.astype(dtype).astype(p.dtype)
  scale = jnp.max(jnp.abs(p.astype(jnp.float32))) / float(jnp.finfo(FP8).max)
  scale = jnp.where(scale > 0, scale, 1.0)
  return ((p.astype(jnp.float32) / scale).astype(FP8).astype(jnp.float32) * scale
          ).astype(p.dtype)


def cast_params(model: nnx.Module, dtype) -> nnx.Module:
  """A copy of model whose floating nnx.Params are rounded to dtype (stored back in their dtype);
  float8_e4m3fn: per-tensor scaled (`quantize`)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rounded = jax.tree.map(
      lambda p: quantize(p, dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  return nnx.merge(graphdef, rounded, rest)


def submodel_masks(model: nnx.Module, sub) -> elastic_lib.ElasticMasks:
  """ElasticMasks of SubModel sub for model (its top-k set is {sub.top_k, model top_k})."""
  if isinstance(sub, elastic_lib.ElasticMasks):
    return sub
  if not isinstance(sub, elastic_lib.SubModel):
    raise ValueError(f"sub={sub!r} is not accepted: expected an elastic SubModel or "
                     "ElasticMasks (model/elastic.py)")
  from ernie5_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.default_config()
  cfg.model.update(dict(num_layers=model.num_layers, num_dense_layers=model.num_dense_layers,
                        num_experts=model.num_experts, top_k=model.top_k))
  kept = elastic_lib.kept_layers(cfg, sub)  # Checks sub against the model (ConfigError).
  top_ks = tuple(sorted({sub.top_k, model.top_k}))
  return elastic_lib.ElasticMasks(
      layer_keep=jnp.asarray(np.isin(np.arange(model.num_layers), kept)),
      expert_mask=jnp.arange(model.num_experts) < sub.experts,
      top_k_index=jnp.asarray(top_ks.index(sub.top_k), jnp.int32), top_ks=top_ks)


class DecoderCache:
  """Compiled rollout decoders, kept by their owner (an RL run) to reuse across its rollouts.

  The decode steps take the state as an argument, so one decoder serves every state of one
  graph (a dtype-rounded copy included): one per (graphdef, sub-model).
  """

  def __init__(self):
    self._decoders: dict[Any, CachedDecoder] = {}

  def get(self, model: nnx.Module, dtype, sub) -> CachedDecoder:
    """The CachedDecoder of the rollout copy of model, holding that copy's state."""
    engine = model if dtype is None else cast_params(model, dtype)
    graphdef = nnx.graphdef(engine)
    key = None
    if not isinstance(sub, elastic_lib.ElasticMasks):  # Masks may be traced: not a key.
      try:
        key = (graphdef, sub)
        hash(key)
      except TypeError:
        key = None
    if key is not None and key in self._decoders:
      dec = self._decoders[key]
      dec.load(engine)  # In the decoder's own layout of the weights (unrolled on CPU).
      return dec
    dec = CachedDecoder(engine, elastic=None if sub is None else submodel_masks(model, sub))
    if key is not None:
      self._decoders[key] = dec
    return dec


_behaviour_logprobs = jax.jit(sampling_lib.token_log_probs)  # (logits, ids, sampling, lo, hi)


def policy_log_probs(logits: jax.Array, fields: dict[str, jax.Array], temperature: float
                     ) -> jax.Array:
  """log p [N, S, V] of the trained policy: the sampled id range at the rollout temperature
  (no top-p; module docstring); temperature 0 (greedy rollouts) reads as 1."""
  sampling = sampling_lib.Sampling(temperature=temperature or 1.0, top_p=1.0)
  return sampling_lib.log_probs(logits, sampling, lo=fields["sample_lo"],
                                hi=fields["sample_hi"])


def _step_inputs(tokens, positions, group, audio_levels) -> StepInputs:
  """StepInputs of T fed positions: tokens [N, T], positions [N, T, 3], one group id."""
  n, t = tokens.shape
  return StepInputs(tokens=jnp.asarray(tokens, jnp.int32),
                    positions=jnp.asarray(positions, jnp.int32),
                    segment_ids=jnp.ones((n, t), jnp.int32),
                    group_ids=jnp.full((n, t), group, jnp.int32),
                    audio_codes=jnp.full((n, t, audio_levels), -1, jnp.int32))


def _default_layout(prompts) -> seq_lib.VocabularyLayout:
  layout = getattr(prompts, "layout", None)
  if layout is not None:
    return layout
  from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
  return multimodal.vocabulary_layout()


# --- rollout ----------------------------------------------------------------------------------
def rollout(model: nnx.Module, prompts, *, group_size: int, max_new_tokens: int,
            sampling: Sampling, rng: jax.Array, dtype=None, sub=None,
            layout: seq_lib.VocabularyLayout | None = None,
            decoders: DecoderCache | None = None) -> Rollouts:
  """Samples group_size responses per prompt of a PromptBatch (input_pipeline/verifiable.py); module docstring.

  layout: the vocabulary layout (EOS, text / image id ranges); default prompts.layout if it
  has one, else the default data config's (input_pipeline/multimodal.vocabulary_layout).
  decoders: the caller's compiled decoders, reused across its calls (an RL run keeps one);
  None compiles this call's own.
  """
  kind = prompts.response_kind
  if kind not in RESPONSE_KINDS:
    raise ValueError(f"prompts.response_kind={kind!r} is not accepted: expected one of "
                     f"{RESPONSE_KINDS}")
  if group_size < 1:
    raise ValueError(f"group_size={group_size} is not accepted: expected >= 1")
  if kind == "text" and max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not accepted: expected >= 1")
  layout = _default_layout(prompts) if layout is None else layout
  vocab = int(model.embed.table.shape[0])
  if layout.vocab_size > vocab:
    raise ValueError(f"layout.vocab_size={layout.vocab_size} is not accepted: the model has "
                     f"{vocab} ids")
  g = group_size
  fields = {k: np.repeat(np.asarray(prompts.fields[k]), g, axis=0) for k in _FIELDS}
  next_position = np.repeat(np.asarray(prompts.next_position, np.int32), g)
  dec = (DecoderCache() if decoders is None else decoders).get(model, dtype, sub)
  keys = (jax.random.fold_in(rng, i) for i in range(1 << 30))
  try:
    if kind == "text":
      out = _text(dec, layout, fields, next_position, max_new_tokens, sampling, keys)
    else:
      out = _image(dec, layout, fields, next_position, int(prompts.next_group), sampling, keys)
  finally:
    dec.state = None  # The cached decoder keeps its compiled steps, not this model's params.
  num = len(prompts.prompt_ids)
  return Rollouts(family=prompts.family,
                  prompt_ids=np.repeat(np.asarray(prompts.prompt_ids, np.int64), g),
                  group_index=np.repeat(np.arange(num, dtype=np.int32), g), group_size=g,
                  **out)


def _sequences(fields: dict[str, np.ndarray], extra: int) -> dict[str, np.ndarray]:
  """The prompt fields [N, Lp, ...] right-padded by `extra` positions (segment 0)."""
  pad = lambda a, value: np.concatenate(
      [a, np.full((a.shape[0], extra) + a.shape[2:], value, a.dtype)], axis=1)
  return {"tokens": pad(fields["tokens"], 0), "positions": pad(fields["positions"], 0),
          "segment_ids": pad(fields["segment_ids"], 0), "group_ids": pad(fields["group_ids"], 0),
          "audio_codes": pad(fields["audio_codes"], -1)}


def _text(dec: CachedDecoder, layout, fields, next_position, max_new, sampling, keys):
  """Text responses (module docstring): one token per step until every row has an EOS."""
  n, lp = fields["tokens"].shape
  cache = dec.init_cache(batch=n, max_len=lp + max_new)
  text = dict(lo=0, hi=layout.text_size)
  inputs = StepInputs(**{k: jnp.asarray(v) for k, v in fields.items()})
  out, cache = dec.step(cache, inputs, next(keys), sampling, **text)  # Prefill.
  token = out.tokens[:, -1]  # [N]
  generated, logps = [token], [_behaviour_logprobs(out.logits[:, -1], token, sampling, **text)]
  expert_ids = [out.expert_ids]  # [L_moe, N, T, K] per step
  done = np.asarray(token) == layout.eos_id
  position = next_position.copy()
  for _ in range(max_new - 1):
    if done.all():
      break
    out, cache = dec.step(cache, _step_inputs(token[:, None], np.repeat(
        position[:, None, None], 3, 2), 0, dec.audio_levels), next(keys), sampling, **text)
    token = out.tokens[:, 0]
    generated.append(token)
    logps.append(_behaviour_logprobs(out.logits[:, 0], token, sampling, **text))
    expert_ids.append(out.expert_ids)
    position = position + 1
    done |= np.asarray(token) == layout.eos_id
  ids = np.asarray(jnp.stack(generated, 1))  # [N, steps]
  logp = np.asarray(jnp.stack(logps, 1))  # [N, steps]
  recorded = np.asarray(jnp.concatenate(expert_ids, axis=2))  # [L_moe, N, Lp + steps - 1, K]

  seq = _sequences(fields, max_new)
  s = lp + max_new
  targets = np.zeros((n, s), np.int32)
  mask = np.zeros((n, s), np.float32)
  infer = np.zeros((n, s), np.float32)
  vocab = int(out.logits.shape[-1])
  routing = np.full(recorded.shape[:2] + (s,) + recorded.shape[3:], -1, np.int32)
  responses, complete = [], np.zeros((n,), bool)
  for i in range(n):
    eos = np.flatnonzero(ids[i] == layout.eos_id)
    length = int(eos[0]) + 1 if len(eos) else ids.shape[1]
    complete[i] = bool(len(eos))
    resp = ids[i, :length].astype(np.int32)
    responses.append(resp)
    span = slice(lp, lp + length)
    seq["tokens"][i, span] = resp
    seq["positions"][i, span] = (next_position[i] + np.arange(length))[:, None]
    seq["segment_ids"][i, span] = 1
    # Position lp - 1 + j predicts response token j.
    targets[i, lp - 1:lp - 1 + length] = resp
    mask[i, lp - 1:lp - 1 + length] = 1.0
    infer[i, lp - 1:lp - 1 + length] = logp[i, :length]
    fed = min(lp + length, recorded.shape[2])  # The row's own positions that were fed.
    routing[:, i, :fed] = recorded[:, i, :fed]
  # Targets elsewhere: the next token (mask 0), as training's next-token layout.
  nxt = np.concatenate([seq["tokens"][:, 1:], np.zeros((n, 1), np.int32)], axis=1)
  targets = np.where(mask > 0, targets, nxt).astype(np.int32)
  return dict(**seq, targets=targets, response_mask=mask, infer_logprobs=infer,
              expert_ids=routing, response_tokens=responses, complete=complete,
              sample_lo=np.zeros((n, s), np.int32),
              sample_hi=np.where(mask > 0, layout.text_size, vocab).astype(np.int32))


def _image(dec: CachedDecoder, layout, fields, next_position, next_group, sampling, keys):
  """Image responses (module docstring): one step per scale, as generate_images."""
  n, lp = fields["tokens"].shape
  scales = tuple(layout.image_scales)
  total = sum(side * side for side in scales)
  cache = dec.init_cache(batch=n, max_len=lp + total)
  inputs = StepInputs(**{k: jnp.asarray(v) for k, v in fields.items()})
  out, cache = dec.step(cache, inputs, next(keys), sampling)  # Prefill.
  expert_ids = [out.expert_ids]
  seq = _sequences(fields, total)
  targets = np.concatenate([fields["tokens"][:, 1:], np.zeros((n, total + 1), np.int32)], 1)
  targets[:, lp - 1] = layout.special("SOS")  # BOI -> SOS: structure, not generated.
  mask = np.zeros((n, lp + total), np.float32)
  infer = np.zeros((n, lp + total), np.float32)
  sample_lo = np.zeros((n, lp + total), np.int32)
  sample_hi = np.full((n, lp + total), int(out.logits.shape[-1]), np.int32)
  top, start, codes, sampled = scales[-1], lp, [], []
  for k, side in enumerate(scales):
    if k == 0:
      feed = np.full((n, 1), layout.special("SOS"), np.int32)
    else:
      # pylint: disable-next=protected-access
      up = np.stack([seq_lib._upsample_nearest(c, side) for c in codes[-1]])
      feed = up.reshape(n, side * side) + layout.image_code_offset(k - 1)
    grid = seq_lib._vision_grid(side, top)  # pylint: disable=protected-access
    positions = grid[None] + next_position[:, None, None]  # [N, s*s, 3]
    lo = layout.image_code_offset(k)
    out, cache = dec.step(cache, _step_inputs(feed, positions, next_group + k,
                                              dec.audio_levels), next(keys), sampling,
                          lo=lo, hi=lo + layout.image_codebook_size)
    ids = np.asarray(out.tokens)  # [N, s*s] vocabulary ids
    span = slice(start, start + side * side)
    seq["tokens"][:, span] = feed
    seq["positions"][:, span] = positions
    seq["segment_ids"][:, span] = 1
    seq["group_ids"][:, span] = next_group + k
    targets[:, span] = ids
    mask[:, span] = 1.0
    infer[:, span] = np.asarray(_behaviour_logprobs(out.logits, out.tokens, sampling, lo=lo,
                                                    hi=lo + layout.image_codebook_size))
    sample_lo[:, span], sample_hi[:, span] = lo, lo + layout.image_codebook_size
    expert_ids.append(out.expert_ids)
    codes.append((ids - lo).reshape(n, side, side))
    sampled.append(ids)
    start += side * side
  responses = list(np.concatenate(sampled, axis=1).astype(np.int32))
  return dict(**seq, targets=targets.astype(np.int32), response_mask=mask,
              infer_logprobs=infer,
              expert_ids=np.asarray(jnp.concatenate(expert_ids, axis=2)).astype(np.int32),
              response_tokens=responses, complete=np.ones((n,), bool),
              sample_lo=sample_lo, sample_hi=sample_hi)


# --- the training forward -----------------------------------------------------------------------
def logprobs_fn(model: nnx.Module, batch_fields: dict[str, jax.Array],
                replay_ids: jax.Array | None = None, temperature: float = 1.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """log p(targets) [N, S] of the TRAINING forward (Decoder.__call__), and its aux.

  Pure (jit / grad-able over the model's params): batch_fields holds tokens, positions,
  segment_ids, group_ids, audio_codes, targets, sample_lo and sample_hi
  (`Rollouts.fields()`); replay_ids [L_moe, N, S, K] (Rollouts.expert_ids) routes as the
  rollout did, None routes live. The policy of `policy_log_probs` (the sampled id range at
  `temperature`), the quantity infer_logprobs records for the behaviour engine.
  """
  logits, aux = model(batch_fields["tokens"], batch_fields["positions"],
                      batch_fields["segment_ids"], batch_fields["group_ids"],
                      batch_fields.get("audio_codes"), routing_replay=replay_ids)
  logp = policy_log_probs(logits, batch_fields, temperature)  # [N, S, V] float32
  return jnp.take_along_axis(logp, batch_fields["targets"][..., None], axis=-1)[..., 0], aux


_jit_logprobs = nnx.jit(logprobs_fn, static_argnames=("temperature",))


def train_logprobs(model: nnx.Module, rollouts: Rollouts, *, replay: bool,
                   temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training log p(targets) [N, S] of rollouts (0 where response_mask is 0), and aux.

  replay: route with rollouts.expert_ids (rollout router replay) or live; temperature:
  the rollouts' sampling temperature.
  """
  fields = {k: jnp.asarray(v) for k, v in rollouts.fields().items()}
  replay_ids = jnp.asarray(rollouts.expert_ids, jnp.int32) if replay else None
  logp, aux = _jit_logprobs(model, fields, replay_ids, temperature=temperature)
  return jnp.where(jnp.asarray(rollouts.response_mask) > 0, logp, 0.0), aux
