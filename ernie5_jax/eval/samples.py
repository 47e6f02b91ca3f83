"""Samples from a trained checkpoint: text, caption->image (scored), text->audio; decode speed.

  python -m ernie5_jax.main --mode=generate --checkpoint=/tmp/tiny --workdir=/tmp/tiny_samples \
      [--config=experiments/tiny.py --config.generate.temperature=0]

restores --checkpoint (its stored config, plus any --config.* overrides, as --mode=eval)
and writes into --workdir:
  text.txt                     each prompt and its continuation
  image_d<digit>_<j>.png       one generated image per caption (16x16, zoomed x8)
  images.png                   all of them, one row per digit
  audio_d<digit>_<j>.wav       one generated clip per caption (8 kHz, 16-bit)
  report.json                  settings, digit accuracy of the images (and of the audio),
                               decode tokens/s
Images are scored by the digit classifier trained on the real images
(eval/digit_classifier.py); audio by the keypad tone it carries (`keypad_digits`).
Prompts are the data's own (data/digits_multimodal/generate.py make_texts): caption for
caption->image, audio caption for text->audio.

A model with its own text tokenizer (config.data.text_model: an imported ERNIE 4.5
checkpoint, ernie5_jax/interop) has no image or audio vocabulary: it gets the text
continuations (with that tokenizer) and the decode speed only (`generate_text_samples`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ernie5_jax import store
from ernie5_jax.generate import loops, media
from ernie5_jax.generate.decode import CachedDecoder, StepInputs
from ernie5_jax.generate.sampling import GREEDY, Sampling
from ernie5_jax.input_pipeline import multimodal
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline import tokenizers as tok_lib

TEXT_PROMPTS = ("Return the number of", "This module provides", "If the file is",
                "Q: what digit is shown? A:")
_IMAGE_ZOOM = 8


def decode_tokens_per_sec(config: ml_collections.ConfigDict, model: nnx.Module, *,
                          batch: int = 8, prompt_len: int = 16, new_tokens: int = 32,
                          seed: int = 0, decoder: CachedDecoder | None = None) -> float:
  """Greedy text decode throughput (generated tokens / s, all rows) with the KV cache.

  Times new_tokens cached steps of `batch` rows after a prompt_len prefill, compiles and
  one warm-up step excluded; model is any Decoder (a full or an exported sub-model).
  config is that model's config (its vocabulary bounds the random prompt ids); decoder:
  a CachedDecoder of model to reuse (its compiled steps), else a new one.
  """
  if min(batch, prompt_len, new_tokens) < 1:
    raise ValueError(f"batch={batch}, prompt_len={prompt_len}, new_tokens={new_tokens} are not "
                     "accepted: expected each >= 1")
  dec = decoder or CachedDecoder(model)
  rng = np.random.default_rng(seed)
  vocab = min(int(config.model.vocab_size), dec.vocab_size)
  index = np.arange(prompt_len, dtype=np.int32)
  prompt = StepInputs(
      tokens=jnp.asarray(rng.integers(0, vocab, (batch, prompt_len)), jnp.int32),
      positions=jnp.broadcast_to(jnp.asarray(index)[None, :, None], (batch, prompt_len, 3)),
      segment_ids=jnp.ones((batch, prompt_len), jnp.int32),
      group_ids=jnp.zeros((batch, prompt_len), jnp.int32),
      audio_codes=jnp.full((batch, prompt_len, dec.audio_levels), -1, jnp.int32))
  key = jax.random.key(seed)
  cache = dec.init_cache(batch=batch, max_len=prompt_len + new_tokens + 1)
  out, cache = dec.step(cache, prompt, key, GREEDY)
  token = out.tokens[:, -1]
  positions = [jnp.full((batch,), prompt_len + i, jnp.int32) for i in range(new_tokens + 1)]
  token, cache = dec.text_step(cache, token, positions[0], key)  # Compile + warm-up.
  token.block_until_ready()
  start = time.perf_counter()
  for i in range(1, new_tokens + 1):
    token, cache = dec.text_step(cache, token, positions[i], key)
  token.block_until_ready()
  return batch * new_tokens / (time.perf_counter() - start)


def keypad_digits(waves: np.ndarray, sample_rate: int) -> np.ndarray:
  """Digit [N] whose keypad tone (row + column frequency) dominates each wave [N, L].

  Goertzel-style power at the data's keypad frequencies (data/digits_multimodal,
  ITU-T Q.23 rounded to 50 Hz): the strongest row and the strongest column name the key.
  """
  from data.digits_multimodal import generate as digits  # pylint: disable=g-import-not-at-top
  waves = np.asarray(waves, np.float64)
  t = np.arange(waves.shape[1]) / sample_rate

  def power(freqs):  # [N, len(freqs)]
    basis = np.exp(-2j * np.pi * np.asarray(freqs)[:, None] * t[None])  # [F, L]
    return np.abs(waves @ basis.T) ** 2
  row = np.argmax(power(digits._ROW_HZ), -1)  # pylint: disable=protected-access
  col = np.argmax(power(digits._COL_HZ), -1)  # pylint: disable=protected-access
  key_of = {rc: d for d, rc in digits._KEY.items()}  # pylint: disable=protected-access
  return np.array([key_of.get((r, c), -1) for r, c in zip(row, col)], np.int64)


def _captions(field: str, per_digit: int, seed: int) -> tuple[list[str], np.ndarray]:
  """per_digit data-style texts (caption / audio_caption) per digit 0..9, and their labels."""
  from data.digits_multimodal import generate as digits  # pylint: disable=g-import-not-at-top
  texts, labels = [], []
  for label in range(10):
    for j in range(per_digit):
      rng = np.random.default_rng((seed, label, j))
      texts.append(digits.make_texts(label, 0, rng)[field])
      labels.append(label)
  return texts, np.asarray(labels, np.int64)


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  per_digit = {str(d): float(np.mean(predicted[labels == d] == d)) for d in range(10)}
  return {"accuracy": float(np.mean(predicted == labels)), "per_digit": per_digit,
          "predicted": predicted.tolist()}


def generate_samples(config: ml_collections.ConfigDict, model: nnx.Module, out_dir: str, *,
                     per_digit: int = 3, sampling: Sampling = GREEDY, seed: int = 0,
                     text_tokens: int = 24, score_images: bool = True) -> dict[str, Any]:
  """Writes text, image and audio samples of `model` under out_dir; returns the report dict."""
  os.makedirs(out_dir, exist_ok=True)
  data_cfg = multimodal.MultimodalConfig.from_config(config.data)
  data_dir = data_cfg.data_dir or multimodal.default_data_dir()
  toks = tok_lib.ensure_tokenizers(data_dir, data_cfg.dataset, seed=data_cfg.tokenizer_seed,
                                   text_model=data_cfg.text_model)
  layout = seq_lib.VocabularyLayout.from_tokenizers(toks)
  dec = CachedDecoder(model)
  report: dict[str, Any] = {"sampling": {"temperature": float(sampling.temperature),
                                         "top_p": float(sampling.top_p)}, "seed": seed}
  start = time.perf_counter()

  # Text continuation.
  prompts = [toks.text.encode(p) for p in TEXT_PROMPTS]
  continued = loops.generate_text(dec, layout, prompts, max_new_tokens=text_tokens,
                                  sampling=sampling, seed=seed)
  report["text"] = [{"prompt": p, "continuation": toks.text.decode(c)}
                    for p, c in zip(TEXT_PROMPTS, continued)]
  with open(os.path.join(out_dir, "text.txt"), "w") as f:
    for item in report["text"]:
      f.write(f"{item['prompt']!r} -> {item['continuation']!r}\n")

  # Caption -> image and text -> audio: one prompt and cache length for both (shared compiles).
  captions, labels = _captions("caption", per_digit, seed)
  audio_captions, audio_labels = _captions("audio_caption", per_digit, seed)
  image_ids = [toks.text.encode(c) for c in captions]
  audio_ids = [toks.text.encode(c) for c in audio_captions]
  scales = tuple(data_cfg.image_scales)
  from data.digits_multimodal import generate as digits  # pylint: disable=g-import-not-at-top
  spec = toks.audio.spec
  frames = digits.AUDIO_LEN // spec.frame  # The data's clip length.
  prompt_len = 1 + max(len(c) for c in image_ids + audio_ids)  # Caption + BOI / BOA.
  lengths = dict(prompt_len=prompt_len,
                 cache_len=prompt_len + max(sum(s * s for s in scales), frames))

  codes = loops.generate_images(dec, layout, image_ids, scales=scales, sampling=sampling,
                                seed=seed + 1, **lengths)
  images = np.clip(toks.image.decode(codes), 0.0, 1.0)  # [N, 16, 16]
  for i, (image, label) in enumerate(zip(images, labels)):
    media.save_png(os.path.join(out_dir, f"image_d{label}_{i % per_digit}.png"), image,
                   zoom=_IMAGE_ZOOM)
  media.save_png(os.path.join(out_dir, "images.png"), media.grid(images, columns=per_digit),
                 zoom=_IMAGE_ZOOM)
  report["image"] = {"captions": captions, "scales": list(scales)}
  if score_images:
    from ernie5_jax.eval import digit_classifier  # pylint: disable=g-import-not-at-top
    report["image"].update(_accuracy(digit_classifier.classify(
        images, dataset=data_cfg.dataset, data_dir=data_dir), labels))

  clips = loops.generate_audio(dec, layout, audio_ids, frames=frames, sampling=sampling,
                               seed=seed + 2, **lengths)
  waves = toks.audio.decode(clips)  # [N, frames * frame]
  for i, (w, label) in enumerate(zip(waves, audio_labels)):
    media.save_wav(os.path.join(out_dir, f"audio_d{label}_{i % per_digit}.wav"), w,
                   sample_rate=spec.sample_rate)
  report["audio"] = {"captions": audio_captions, "frames": frames,
                     **_accuracy(keypad_digits(waves, spec.sample_rate), audio_labels)}
  report["seconds"] = time.perf_counter() - start
  report["decode_tokens_per_sec"] = decode_tokens_per_sec(config, model, seed=seed, decoder=dec)
  report["decode"] = (f"greedy KV-cache text decode, batch 8, 32 new tokens after a 16-token "
                      f"prefill, {jax.default_backend()}")
  report["compiles"] = {" ".join(map(str, k)): v for k, v in dec.traces.items()}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def generate_text_samples(config: ml_collections.ConfigDict, model: nnx.Module, out_dir: str,
                          *, sampling: Sampling = GREEDY, seed: int = 0,
                          text_tokens: int = 24) -> dict[str, Any]:
  """Text continuations of TEXT_PROMPTS with config.data.text_model and the decode speed,
  written under out_dir (text.txt, report.json); returns the report dict."""
  os.makedirs(out_dir, exist_ok=True)
  tok = tok_lib.text_tokenizer(config.data.text_model)
  layout = seq_lib.VocabularyLayout(text_size=tok.vocab_size, pad_id=tok.pad_id,
                                    eos_id=tok.eos_id)
  dec = CachedDecoder(model)
  start = time.perf_counter()
  continued = loops.generate_text(dec, layout, [tok.encode(p) for p in TEXT_PROMPTS],
                                  max_new_tokens=text_tokens, sampling=sampling, seed=seed)
  report: dict[str, Any] = {
      "sampling": {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p)},
      "seed": seed, "tokenizer": config.data.text_model,
      "text": [{"prompt": p, "continuation": tok.decode(c)}
               for p, c in zip(TEXT_PROMPTS, continued)]}
  with open(os.path.join(out_dir, "text.txt"), "w") as f:
    for item in report["text"]:
      f.write(f"{item['prompt']!r} -> {item['continuation']!r}\n")
  report["seconds"] = time.perf_counter() - start
  report["decode_tokens_per_sec"] = decode_tokens_per_sec(config, model, seed=seed, decoder=dec)
  return report


def generate_from_checkpoint(checkpoint_path: str, out_dir: str, *,
                             config: ml_collections.ConfigDict | None = None,
                             override_fields: tuple[str, ...] = (), step: int | None = None
                             ) -> dict[str, Any]:
  """Restores checkpoint_path and writes generate_samples (settings: config.generate) to out_dir.

  checkpoint_path: anything train/checkpoint.py restore_model accepts; config /
  override_fields: as `store.resolve_config`; step: of a workdir (default: the latest).
  """
  loc = store.locate(checkpoint_path, step)
  config = store.resolve_config(loc, config, override_fields)
  config, model = store.restore_model(loc, config=config)
  g = config.generate
  sampling = Sampling(g.temperature, g.top_p)
  if config.data.get("text_model"):  # A text model with its own vocabulary (module doc).
    report = generate_text_samples(config, model, out_dir, sampling=sampling, seed=g.seed,
                                   text_tokens=g.text_tokens)
  else:
    report = generate_samples(config, model, out_dir, per_digit=g.samples_per_digit,
                              sampling=sampling, seed=g.seed, text_tokens=g.text_tokens)
  report.update(checkpoint=str(loc.model_dir), step=loc.step)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  step_note = "" if loc.step is None else f" (step {loc.step})"
  if "image" in report:
    print(f"samples of {loc.model_dir}{step_note} in {out_dir}: caption->image digit "
          f"accuracy {report['image'].get('accuracy', float('nan')):.3f}, text->audio keypad "
          f"accuracy {report['audio']['accuracy']:.3f}, decode "
          f"{report['decode_tokens_per_sec']:.0f} tokens/s")
  else:
    print(f"text samples of {loc.model_dir}{step_note} in {out_dir}: decode "
          f"{report['decode_tokens_per_sec']:.0f} tokens/s")
  for item in report["text"]:
    print(f"  {item['prompt']!r} -> {item['continuation']!r}")
  return report
