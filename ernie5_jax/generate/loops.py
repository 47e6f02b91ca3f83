"""Decoding loops per modality, fed exactly as training lays out the document (sequence.py).

Prompts (input_pipeline/prompts.py) are left-padded to one length (segment 0) and
prefilled in one step; then:
- text continuation: one token per step (`CachedDecoder.text_step`), t = h = w = r;
- caption -> image (next-scale prediction, VAR arXiv 2404.02905 / ERNIE 5.0): the prompt
  ends in BOI; scale k is ONE step of s_k * s_k positions in one new group, inputs SOS
  (k = 1) or the nearest-upsampled codes of scale k - 1, positions centre-aligned on the
  top scale's grid (frame t = base, h/w = base + cell centre), ids sampled from scale
  k's codebook range;
- text -> audio (next-codec prediction): the prompt ends in BOA; each step feeds the
  previous frame (its level-1 token with its K codes summed in, as training's
  audio_codes) and samples the next frame: level 1 from the LM head within the audio
  range, levels 2..K from the audio heads.
Every fed position is recorded in a `Transcript`, so a test can check it against the
document `DocumentWriter` builds from the generated codes. Compiled steps are keyed by
(batch, positions fed, cache length): fix prompt_len and cache_len to share them between
calls of different tasks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ernie5_jax.generate.decode import CachedDecoder, as_inputs
from ernie5_jax.generate.sampling import GREEDY, Sampling
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline.prompts import audio_prompt, image_prompt, pad_prompts

_INPUT_FIELDS = ("tokens", "positions", "segment_ids", "group_ids", "audio_codes")


class Transcript:
  """Every position fed to the model, per row, in order (padding dropped)."""

  def __init__(self):
    self._steps: list[dict[str, np.ndarray]] = []

  def add(self, fields: dict[str, np.ndarray]) -> None:
    """Records one step's input fields [batch, T, ...]."""
    self._steps.append({k: np.asarray(fields[k]) for k in _INPUT_FIELDS})

  def row(self, i: int) -> dict[str, np.ndarray]:
    """Row i's fed fields [n, ...] (segment 1 only)."""
    out = {k: np.concatenate([s[k][i] for s in self._steps]) for k in _INPUT_FIELDS}
    keep = out["segment_ids"] > 0
    return {k: v[keep] for k, v in out.items()}


def _step_fields(tokens: np.ndarray, positions: np.ndarray, group: int, audio: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """Step fields of T positions per row: tokens [B, T], positions [B, T, 3], audio [B, T, K]."""
  b, t = tokens.shape
  return {"tokens": tokens.astype(np.int32), "positions": positions.astype(np.int32),
          "segment_ids": np.ones((b, t), np.int32),
          "group_ids": np.full((b, t), group, np.int32), "audio_codes": audio.astype(np.int32)}


def _cache_len(asked: int | None, needed: int) -> int:
  """The cache length: `asked` (a fixed length shares compiled steps across calls) or `needed`."""
  if asked is None:
    return needed
  if asked < needed:
    raise ValueError(f"cache_len={asked} is not accepted: this generation needs {needed} slots")
  return asked


def _keys(seed: int):
  key = jax.random.key(seed)
  step = 0
  while True:
    yield jax.random.fold_in(key, step)
    step += 1


# --- text -----------------------------------------------------------------------------------
def generate_text(dec: CachedDecoder, layout: seq_lib.VocabularyLayout,
                  prompts: Sequence[np.ndarray], *, max_new_tokens: int,
                  sampling: Sampling = GREEDY, seed: int = 0, prompt_len: int | None = None,
                  transcript: Transcript | None = None, stop_at_eos: bool = True,
                  cache_len: int | None = None) -> list[np.ndarray]:
  """Continues each text prompt (ids [n]) by up to max_new_tokens text ids.

  With stop_at_eos a row's continuation ends before its first EOS and decoding stops once
  every row has one; without, every row gets max_new_tokens ids (EOS included).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not accepted: expected >= 1")
  docs = [seq_lib.DocumentWriter(layout).text(np.asarray(p, np.int32)).finish() for p in prompts]
  batch = pad_prompts(docs, audio_levels=dec.audio_levels, length=prompt_len)
  b, p = batch.fields["tokens"].shape
  keys = _keys(seed)
  cache = dec.init_cache(batch=b, max_len=_cache_len(cache_len, p + max_new_tokens))
  if transcript is not None:
    transcript.add(batch.fields)
  out, cache = dec.step(cache, as_inputs(batch.fields), next(keys), sampling, lo=0,
                        hi=layout.text_size)
  token = out.tokens[:, -1]  # [batch]
  generated = [np.asarray(token)]
  position = batch.next_position.copy()
  done = generated[0] == layout.eos_id
  for _ in range(max_new_tokens - 1):
    if stop_at_eos and done.all():
      break
    if transcript is not None:
      transcript.add(_step_fields(generated[-1][:, None],
                                  np.repeat(position[:, None, None], 3, 2), 0,
                                  np.full((b, 1, dec.audio_levels), -1)))
    token, cache = dec.text_step(cache, token, position, next(keys), sampling, lo=0,
                                 hi=layout.text_size)
    position = position + 1
    generated.append(np.asarray(token))
    done |= generated[-1] == layout.eos_id
  ids = np.stack(generated, 1)  # [batch, steps]
  if not stop_at_eos:
    return list(ids)
  result = []
  for row in ids:
    stop = np.flatnonzero(row == layout.eos_id)
    result.append(row[:stop[0]] if len(stop) else row)
  return result


# --- images ---------------------------------------------------------------------------------
def generate_images(dec: CachedDecoder, layout: seq_lib.VocabularyLayout,
                    captions: Sequence[np.ndarray], *, scales: Sequence[int] | None = None,
                    sampling: Sampling = GREEDY, seed: int = 0, prompt_len: int | None = None,
                    transcript: Transcript | None = None, cache_len: int | None = None
                    ) -> list[np.ndarray]:
  """Codes of each scale, [N, s, s] raw (0..codebook-1), of one image per caption.

  scales: a prefix of layout.image_scales (default: all of them); the top one sets the
  position grid, as config.data.image_scales does in training.
  """
  scales = tuple(layout.image_scales if scales is None else scales)
  if scales != tuple(layout.image_scales[:len(scales)]):
    raise ValueError(f"scales={scales} is not accepted: expected a prefix of the layout's "
                     f"image_scales={layout.image_scales}")
  batch = pad_prompts([image_prompt(layout, c) for c in captions],
                      audio_levels=dec.audio_levels, length=prompt_len)
  b, p = batch.fields["tokens"].shape
  keys = _keys(seed)
  cache = dec.init_cache(batch=b, max_len=_cache_len(cache_len, p + sum(s * s for s in scales)))
  if transcript is not None:
    transcript.add(batch.fields)
  _, cache = dec.step(cache, as_inputs(batch.fields), next(keys), sampling)  # Prefill.
  base = batch.next_position  # [batch] the image's frame t; h, w offsets from here
  top = scales[-1]
  sos = layout.special("SOS")
  codes: list[np.ndarray] = []
  for k, side in enumerate(scales):
    if k == 0:
      inputs = np.full((b, 1), sos, np.int32)
    else:
      # pylint: disable-next=protected-access
      up = np.stack([seq_lib._upsample_nearest(c, side) for c in codes[-1]])
      inputs = up.reshape(b, side * side) + layout.image_code_offset(k - 1)
    grid = seq_lib._vision_grid(side, top)  # pylint: disable=protected-access
    positions = grid[None] + base[:, None, None]  # [batch, s*s, 3]
    fields = _step_fields(inputs, positions, batch.next_group + k,
                          np.full((b, side * side, dec.audio_levels), -1))
    if transcript is not None:
      transcript.add(fields)
    lo = layout.image_code_offset(k)
    out, cache = dec.step(cache, as_inputs(fields), next(keys), sampling, lo=lo,
                          hi=lo + layout.image_codebook_size)
    codes.append((np.asarray(out.tokens) - lo).reshape(b, side, side))
  return codes


# --- audio ----------------------------------------------------------------------------------
def generate_audio(dec: CachedDecoder, layout: seq_lib.VocabularyLayout,
                   captions: Sequence[np.ndarray], *, frames: int,
                   sampling: Sampling = GREEDY, seed: int = 0, prompt_len: int | None = None,
                   transcript: Transcript | None = None, cache_len: int | None = None
                   ) -> np.ndarray:
  """Codec codes [N, frames, K] (raw; K = the model's audio levels) of one clip per caption."""
  if frames < 1:
    raise ValueError(f"frames={frames} is not accepted: expected >= 1")
  batch = pad_prompts([audio_prompt(layout, c) for c in captions],
                      audio_levels=dec.audio_levels, length=prompt_len)
  b, p = batch.fields["tokens"].shape
  keys = _keys(seed)
  cache = dec.init_cache(batch=b, max_len=_cache_len(cache_len, p + frames - 1))
  lo, hi = layout.audio_offset, layout.special_offset
  if transcript is not None:
    transcript.add(batch.fields)
  out, cache = dec.step(cache, as_inputs(batch.fields), next(keys), sampling, lo=lo, hi=hi)
  frame = np.asarray(dec.audio_frame(out.hidden[:, -1:], out.tokens[:, -1:], next(keys),
                                     sampling, lo=lo)[:, 0])  # [batch, K]
  clip = [frame]
  position = batch.next_position.copy()
  for _ in range(frames - 1):
    fields = _step_fields(frame[:, :1] + lo, np.repeat(position[:, None, None], 3, 2), 0,
                          frame[:, None])
    if transcript is not None:
      transcript.add(fields)
    out, cache = dec.step(cache, as_inputs(fields), next(keys), sampling, lo=lo, hi=hi)
    position = position + 1
    frame = np.asarray(dec.audio_frame(out.hidden, out.tokens, next(keys), sampling,
                                       lo=lo)[:, 0])
    clip.append(frame)
  return np.stack(clip, 1)
