"""Verifiable prompt families from the embedded digits data, laid out as training documents.

  batch = verifiable.make_prompts(config, "image_digit", split="train", start=0, num=8)
  batch.fields["tokens"]  # [8, Lp] left-padded (segment 0), as prompts.pad_prompts lays out
  hinted = verifiable.with_hints(batch, np.full(8, 0.5))

Families (FAMILIES = config.RL_FAMILIES); each prompt is written with `sequence.DocumentWriter` exactly as
the pre-training document it comes from, so a pre-trained model already partly knows it:
  image_digit       [BOI] image codes [EOI] "Q: what digit is shown? A:"   -> " 3" EOS
                    (the data's own image QA, data/digits_multimodal/generate.py make_texts)
  video_digit       [BOV] moving-digit video codes [EOV] the same question  -> " 3" EOS
  audio_digit       [BOA] keypad-tone frames [EOA] "Q: which key was pressed? A:" -> " 3" EOS
                    (the pipeline's audio QA, input_pipeline/multimodal.py)
  image_arithmetic  two images, "Q: what is the sum of the two digits? A:" -> " 12" EOS
  caption_image     the record's caption, then BOI (prompts.image_prompt) -> the image:
                    next-scale groups (response_kind "image")
Text answers are the digit (or the sum, 0..18) as numerals: the image QA the data asks
("what digit is shown?") answers with the numeral, and so does the audio QA.
References: text families, the answer's token ids followed by EOS; caption_image, the real
image's codes as the vocabulary ids the model generates, scale by scale, each scale's map
row-major with its codebook offset (`image_tokens`) -- the targets DocumentWriter writes
for that image's groups. Answers: the digit, or the sum.

Splits and ids. split "train" reads the data's train split (the records pre-training reads);
"test" reads its held-out split: digits disjoint from train (generate.split_indices), which
pre-training never reads. A prompt's id is a pure function of (family, split, index):
  prompt_id = (family_index * len(SPLITS) + split_index) * ID_STRIDE + index
so train and held-out ids never coincide (and `parse_prompt_id` inverts it). Index i reads
record i % n of the split (n records); image_arithmetic pairs record i % n with a second
record drawn from rng((split_index, i)). Held-out evaluation takes start=0 and
num <= TaskData.num_records("test") (50 on digits_multimodal/tiny, 297 on the full build)
so that no prompt repeats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ernie5_jax import config as config_lib
from ernie5_jax.input_pipeline import multimodal
from ernie5_jax.input_pipeline import prompts as prompt_lib
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline import tokenizers as tok_lib

FAMILIES = config_lib.RL_FAMILIES  # Declared once, with config.rl.families.
SPLITS = ("train", "test")  # The data's training split and its held-out split.
ID_STRIDE = 10**9  # Prompt indices per (family, split) in prompt ids.
QUESTIONS = {
    "image_digit": "Q: what digit is shown? A:",
    "video_digit": "Q: what digit is shown? A:",
    "audio_digit": "Q: which key was pressed? A:",
    "image_arithmetic": "Q: what is the sum of the two digits? A:",
}
RESPONSE_KINDS = {f: ("image" if f == "caption_image" else "text") for f in FAMILIES}


@dataclasses.dataclass
class PromptBatch:
  """Prompts of one family, left-padded (prompts.pad_prompts), with their answers."""
  family: str
  prompt_ids: np.ndarray  # [P] int64: (family, split, index) -> id (module doc)
  fields: dict[str, np.ndarray]  # tokens [P, Lp], positions [P, Lp, 3], segment_ids [P, Lp]
  #                                (0 = pad), group_ids [P, Lp], audio_codes [P, Lp, K]
  next_position: np.ndarray  # [P] int32: running position index after the prompt
  next_group: int  # First group id no prompt uses
  response_kind: str  # "text" or "image"
  answers: np.ndarray  # [P] int64: the digit, or the sum
  references: list[np.ndarray]  # [P] reference response ids (after any hint, see with_hints)
  # [P] reference ids already prefixed to the prompt by with_hints (empty: no hint). The
  # answer a verifier reads is hints[i] followed by the generated response (`full_responses`).
  hints: list[np.ndarray] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if not self.hints:
      self.hints = [np.zeros((0,), np.int32) for _ in range(len(self.prompt_ids))]


@dataclasses.dataclass
class TaskData:
  """Tokenizers, layout and the encoded records of each split (codes memoised by the source)."""
  tokenizers: tok_lib.Tokenizers
  layout: seq_lib.VocabularyLayout
  data_cfg: multimodal.MultimodalConfig
  data_dir: str
  sources: dict[str, Any]  # split -> multimodal.EncodedDigitsSource

  def record(self, split: str, i: int) -> dict[str, Any]:
    """Encoded fields of record i of split (label, image_codes, video_codes, caption, ...)."""
    rec = self.sources[split][i]
    if rec is None:
      raise multimodal.DataError(f"record {i} of split {split!r} could not be read")
    return rec.fields

  def num_records(self, split: str) -> int:
    """Records in split."""
    return len(self.sources[split])


_DATA: dict[tuple, TaskData] = {}


def task_data(config) -> TaskData:
  """The (cached) TaskData of config.data; builds the data and tokenizers on first use."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  cfg = multimodal.MultimodalConfig.from_config(config.data)
  data_dir = cfg.data_dir or multimodal.default_data_dir()
  key = (data_dir, cfg.dataset, cfg.tokenizer_seed, cfg.text_model, tuple(cfg.image_scales),
         tuple(cfg.video_scales), cfg.video_frames)
  if key not in _DATA:
    toks = tok_lib.ensure_tokenizers(data_dir, cfg.dataset, seed=cfg.tokenizer_seed,
                                     text_model=cfg.text_model)
    builder = data_lib.ensure_built(cfg.dataset, data_dir)
    sources = {}
    for split in SPLITS:
      raw = builder.as_data_source(split)
      sources[split] = multimodal.EncodedDigitsSource(raw, np.arange(len(raw)), toks, cfg,
                                                      split=split)
    _DATA[key] = TaskData(toks, seq_lib.VocabularyLayout.from_tokenizers(toks), cfg, data_dir,
                          sources)
  return _DATA[key]


def prompt_id(family: str, split: str, index: int) -> int:
  """Stable id of prompt `index` of (family, split); train and held-out ids are disjoint."""
  _check(family, split)
  if not 0 <= index < ID_STRIDE:
    raise ValueError(f"index={index} is not accepted: expected 0..{ID_STRIDE - 1}")
  return (FAMILIES.index(family) * len(SPLITS) + SPLITS.index(split)) * ID_STRIDE + index


def parse_prompt_id(pid: int) -> tuple[str, str, int]:
  """(family, split, index) of a prompt id (inverse of prompt_id)."""
  code, index = divmod(int(pid), ID_STRIDE)
  f, s = divmod(code, len(SPLITS))
  if not 0 <= f < len(FAMILIES):
    raise ValueError(f"prompt id={pid} is not accepted: its family code {f} is unknown")
  return FAMILIES[f], SPLITS[s], index


def _check(family: str, split: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} is not accepted: expected one of {FAMILIES}")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not accepted: expected one of {SPLITS} ('test' is "
                     "the held-out split)")


def record_indices(data: TaskData, family: str, split: str, index: int) -> tuple[int, ...]:
  """Records of split that prompt `index` of family reads (two for image_arithmetic)."""
  n = data.num_records(split)
  first = index % n
  if family != "image_arithmetic":
    return (first,)
  if n == 1:
    return (first, first)
  second = (first + 1 + int(np.random.default_rng((SPLITS.index(split), index)).integers(n - 1)))
  return (first, second % n)


def image_tokens(layout: seq_lib.VocabularyLayout, codes: list[np.ndarray]) -> np.ndarray:
  """Raw code maps of one image (scale k: [s_k, s_k]) -> its vocabulary ids [sum s_k^2]."""
  return np.concatenate([np.asarray(c).reshape(-1) + layout.image_code_offset(k)
                         for k, c in enumerate(codes)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt: its document parts, answer and reference response."""
  family: str
  prompt_id: int
  prompt: dict[str, np.ndarray]  # DocumentWriter document of the prompt alone
  document: dict[str, np.ndarray]  # DocumentWriter document of prompt + reference response
  answer: int
  reference: np.ndarray  # [R] int32 reference response ids (text: ... EOS; image: codes)


def _write_inputs(w: seq_lib.DocumentWriter, family: str, recs: list[dict],
                  question: np.ndarray) -> seq_lib.DocumentWriter:
  """Writes the understanding part of a text-answer prompt: the media, then the question."""
  m = seq_lib.Modality
  if family == "image_digit":
    w.vision([recs[0]["image_codes"]], m.IMAGE, generate=False)
  elif family == "video_digit":
    w.vision(recs[0]["video_codes"], m.VIDEO, generate=False)
  elif family == "audio_digit":
    w.audio(recs[0]["audio_codes"], loss=False)
  else:  # image_arithmetic
    for r in recs:
      w.vision([r["image_codes"]], m.IMAGE, generate=False)
  return w.text(question, loss=False)


def example(data: TaskData, family: str, split: str, index: int) -> Example:
  """Prompt `index` of (family, split): prompt document, full document, answer, reference."""
  _check(family, split)
  layout, enc = data.layout, data.tokenizers.text.encode
  recs = [data.record(split, i) for i in record_indices(data, family, split, index)]
  if family == "caption_image":
    caption, codes = np.asarray(recs[0]["caption"], np.int32), recs[0]["image_codes"]
    prompt = prompt_lib.image_prompt(layout, caption)
    document = (seq_lib.DocumentWriter(layout).text(caption, loss=False)
                .vision([codes], seq_lib.Modality.IMAGE, generate=True).finish())
    answer, reference = int(recs[0]["label"]), image_tokens(layout, codes)
  else:
    answer = sum(int(r["label"]) for r in recs)
    question = np.asarray(enc(QUESTIONS[family]), np.int32)
    # Encoded alone, " 3" gets SentencePiece's word-start piece, as it does after "A:".
    answer_ids = np.asarray(enc(str(answer)), np.int32)
    prompt = _write_inputs(seq_lib.DocumentWriter(layout), family, recs, question).finish()
    document = _write_inputs(seq_lib.DocumentWriter(layout), family, recs,
                             question).text(answer_ids).finish()
    reference = np.append(answer_ids, layout.eos_id).astype(np.int32)
  return Example(family, prompt_id(family, split, index), prompt, document, answer, reference)


def make_prompts(config, family: str, *, split: str, start: int, num: int,
                 prompt_len: int | None = None) -> PromptBatch:
  """Prompts start .. start+num-1 of (family, split), left-padded to prompt_len (or the longest).

  config: the full config (config.data: data_dir, dataset, image/video scales, video_frames;
  config.model.audio_levels: the audio code levels in fields["audio_codes"]).
  """
  if start < 0 or num < 1:
    raise ValueError(f"start={start}, num={num} are not accepted: expected start >= 0, num >= 1")
  data = task_data(config)
  examples = [example(data, family, split, start + i) for i in range(num)]
  padded = prompt_lib.pad_prompts([e.prompt for e in examples],
                                 audio_levels=int(config.model.audio_levels), length=prompt_len)
  return PromptBatch(
      family=family, prompt_ids=np.array([e.prompt_id for e in examples], np.int64),
      fields=padded.fields, next_position=padded.next_position, next_group=padded.next_group,
      response_kind=RESPONSE_KINDS[family],
      answers=np.array([e.answer for e in examples], np.int64),
      references=[e.reference for e in examples])


def with_hints(batch: PromptBatch, fractions: np.ndarray) -> PromptBatch:
  """Appends the first ceil(f_i * len(reference_i)) reference ids to prompt i (text only).

  The hint never includes the reference's final EOS (the policy must still end its answer).
  The new batch's references are what is left to generate and its hints what was given;
  verifiers read hints[i] + response (`full_responses`). Rows keep the batch's padded length
  when the hints fit, else all grow to the longest. Image batches come back unchanged.
  """
  fractions = np.asarray(fractions, np.float64)
  p = len(batch.prompt_ids)
  if fractions.shape != (p,) or not np.all((fractions >= 0) & (fractions <= 1)):
    raise ValueError(f"fractions (shape {fractions.shape}, values {fractions.tolist()}) are not "
                     f"accepted: expected [{p}] values in [0, 1]")
  if batch.response_kind != "text":
    return batch
  f = batch.fields
  k_levels = f["audio_codes"].shape[-1]
  docs, hints, refs = [], [], []
  for i, (ref, frac) in enumerate(zip(batch.references, fractions)):
    k = min(math.ceil(frac * len(ref)), max(len(ref) - 1, 0))
    keep = f["segment_ids"][i] > 0
    r = int(batch.next_position[i])
    hint = np.asarray(ref[:k], np.int32)
    hint_positions = np.repeat(np.arange(r, r + k, dtype=np.int32)[:, None], 3, 1)  # [k, 3] text
    docs.append({
        "tokens": np.concatenate([f["tokens"][i][keep], hint]),
        "positions": np.concatenate([f["positions"][i][keep], hint_positions]),
        "group_ids": np.concatenate([f["group_ids"][i][keep], np.zeros(k, np.int32)]),
        "audio_codes": np.concatenate([f["audio_codes"][i][keep],
                                       np.full((k, k_levels), -1, np.int32)])})
    hints.append(np.concatenate([batch.hints[i], hint]).astype(np.int32))
    refs.append(np.asarray(ref[k:], np.int32))
  length = max(f["tokens"].shape[1], max(len(d["tokens"]) for d in docs))
  padded = prompt_lib.pad_prompts(docs, audio_levels=k_levels, length=length)
  return dataclasses.replace(batch, fields=padded.fields, next_position=padded.next_position,
                             next_group=padded.next_group, references=refs, hints=hints)


def full_responses(batch: PromptBatch, responses: list[np.ndarray], rows=None
                   ) -> list[np.ndarray]:
  """hints[row] + response for each response (what a verifier reads); rows default 0..P-1."""
  rows = range(len(responses)) if rows is None else rows
  return [np.concatenate([batch.hints[r], np.asarray(x, np.int32)]).astype(np.int32)
          for r, x in zip(rows, responses)]
