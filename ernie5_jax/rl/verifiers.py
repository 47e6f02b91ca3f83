"""Rewards of the verifiable task families (input_pipeline/verifiable.py): plain functions, values in [0, 1].

  ctx = verifiers.make_context(config)
  r = verifiers.reward("image_digit", response_tokens, answer=3, context=ctx)

Text families (image_digit, video_digit, audio_digit, image_arithmetic): the response ids are
cut at the first EOS, pad ids are dropped, the rest is decoded with the text tokenizer and
the numbers it names are read (numerals, or the words zero..nineteen, as whole words).
Reward 1.0 iff it names at least one number and every number it names is the answer: a
response that lists several candidates ("3 or 8") gets 0, so hedging never pays. Any id
outside the text vocabulary before the EOS makes the response garbage: 0.0.

caption_image: the response is the generated image as vocabulary ids, scale by scale
(input_pipeline/verifiable.py `image_tokens`; anything after the last scale, e.g. EOI / EOS / pad, is
ignored). The codes are decoded to pixels by the image tokenizer and clipped to [0, 1], as
eval/samples.py does, and classified by the digit classifier trained on the real train
images (eval/digit_classifier.py). Reward 1.0 iff the predicted digit is the answer: a
binary reward, like the text families, so pass rates compare across families (the
classifier's p(answer) is a denser signal, but it also rewards blurry images that are
merely less wrong). Too few codes, or an id outside its scale's codebook: 0.0.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline import verifiable
from ernie5_jax.input_pipeline import tokenizers as tok_lib

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen")
_WORD = re.compile(r"[a-z]+|\d+")


@dataclasses.dataclass(frozen=True)
class RewardContext:
  """What the verifiers need: the vocabulary layout, tokenizers and (images) the classifier."""
  layout: seq_lib.VocabularyLayout
  tokenizers: tok_lib.Tokenizers
  image_scales: tuple[int, ...]  # Scales of a generated image (config.data.image_scales).
  classifier: object | None = None  # eval.digit_classifier.DigitClassifier; caption_image only.


def make_context(config, *, classifier: bool = True) -> RewardContext:
  """The RewardContext of config.data (tokenizers, and the digit classifier if asked)."""
  data = verifiable.task_data(config)
  clf = None
  if classifier:
    from ernie5_jax.eval import digit_classifier  # pylint: disable=g-import-not-at-top
    clf = digit_classifier.load_or_train(data.data_cfg.dataset, data.data_dir)
  return RewardContext(layout=data.layout, tokenizers=data.tokenizers,
                       image_scales=tuple(data.data_cfg.image_scales), classifier=clf)


def parse_numbers(text: str) -> list[int]:
  """Numbers a text names, in order: numerals and the words zero..nineteen (whole words)."""
  out = []
  for word in _WORD.findall(text.lower()):
    if word.isdigit():
      out.append(int(word))
    elif word in NUMBER_WORDS:
      out.append(NUMBER_WORDS.index(word))
  return out


def response_text(response_tokens: np.ndarray, context: RewardContext) -> str | None:
  """Decoded text of a response (cut at EOS, pad dropped); None if it holds non-text ids."""
  ids = np.asarray(response_tokens).reshape(-1).astype(np.int64)
  layout = context.layout
  stop = np.flatnonzero(ids == layout.eos_id)
  ids = ids[:stop[0]] if len(stop) else ids
  ids = ids[ids != layout.pad_id]
  if np.any((ids < 0) | (ids >= layout.text_size)):
    return None
  return context.tokenizers.text.decode([int(i) for i in ids]) if len(ids) else ""


def text_reward(response_tokens: np.ndarray, answer: int, *, context: RewardContext) -> float:
  """1.0 iff the response names a number and every number it names is `answer`."""
  text = response_text(response_tokens, context)
  numbers = parse_numbers(text) if text else []
  return float(bool(numbers) and all(n == int(answer) for n in numbers))


def image_codes(response_tokens: np.ndarray, layout: seq_lib.VocabularyLayout,
                scales: tuple[int, ...]) -> list[np.ndarray] | None:
  """Vocabulary ids of an image (scale by scale) -> raw code maps [s, s]; None if malformed."""
  ids = np.asarray(response_tokens).reshape(-1).astype(np.int64)
  if len(ids) < sum(s * s for s in scales):
    return None
  codes, at = [], 0
  for k, s in enumerate(scales):
    part = ids[at:at + s * s] - layout.image_code_offset(k)
    if np.any((part < 0) | (part >= layout.image_codebook_size)):
      return None
    codes.append(part.reshape(s, s))
    at += s * s
  return codes


def image_reward(response_tokens: np.ndarray, answer: int, *, context: RewardContext) -> float:
  """1.0 iff the digit classifier reads `answer` in the decoded image, else 0.0."""
  if context.classifier is None:
    raise ValueError("context.classifier=None is not accepted for caption_image: build the "
                     "context with make_context(config, classifier=True)")
  codes = image_codes(response_tokens, context.layout, context.image_scales)
  if codes is None:
    return 0.0
  image = np.clip(context.tokenizers.image.decode([c[None] for c in codes]), 0.0, 1.0)
  return float(int(context.classifier.classify(image)[0]) == int(answer))  # image [1, 16, 16]


# One reward per family of config.RL_FAMILIES, by what its responses are (verifiable.py).
REWARDS = {f: image_reward if kind == "image" else text_reward
           for f, kind in verifiable.RESPONSE_KINDS.items()}


def reward(family: str, response_tokens: np.ndarray, answer: int, *,
           context: RewardContext) -> float:
  """Reward in [0, 1] of one response [R] (ids) to a prompt of `family` whose answer is given."""
  if family not in REWARDS:
    raise ValueError(f"family={family!r} is not accepted: expected one of {tuple(REWARDS)}")
  return REWARDS[family](response_tokens, answer, context=context)
