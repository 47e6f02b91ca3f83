"""grain pipeline over the embedded multimodal data: TFDS source -> shuffle -> tokenize -> pack -> batch.

  it = make_multimodal_iterator(config.data, seq_len=64, batch_size=8, seed=0)
  batch = next(it)            # dict of numpy arrays, see sequence.py for every field
  state = it.get_state()      # save with the checkpoint; it.set_state(state) resumes exactly

Stages (all grain, checkpointable):
1. Source: `builder.as_data_source(split)` of data/digits_multimodal (ArrayRecord,
   random access), this process's shard (records process_index::process_count).
   Reading a record also runs its codecs (image/video multi-scale codes, audio RVQ
   codes, SentencePiece ids); codecs run vectorised over chunks of records and are
   memoised, since they are pure functions of the record.
2. Shuffle (seed, reshuffled every epoch), repeat.
3. Tokenize: one document per record, its task drawn from `tasks` weights with a
   per-element rng (grain random_map); mixed with the stdlib_text corpus
   (weight tasks["text"]; long paragraphs split into seq_len chunks).
4. Pack: grain FirstFitPackIterDataset into rows of seq_len (sequence.pack_documents).
5. Batch: [batch_size, seq_len] (+ trailing dims), drop_remainder.

Corrupt records (records.py): reading one raises DataError naming the split's shard file
and the index inside it; with skip_corrupt=True it is skipped and counted per source and per
task it would have made (`MultimodalPipeline.skips`), up to data.max_skip_fraction.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Mapping

import grain
import jax
import numpy as np

from ernie5_jax import config as config_lib
from ernie5_jax.input_pipeline import records
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline import tokenizers as tok_lib

_CHUNK = 256  # Records encoded together.


DataError = records.DataError  # Where the pipelines' callers have always found it.


@dataclasses.dataclass
class MultimodalConfig:
  """The pipeline's settings: config.data's fields it reads, plus its own knobs.

  The config.data fields are declared and documented once, in ernie5_jax/config.py: a
  field missing from the data config passed in takes config.py's default (so a plain dict
  of overrides works). The knobs after them are the pipeline's own (tests and benchmarks
  set them; they are not config fields).
  """
  data_dir: str
  dataset: str
  split: str
  tasks: Any  # {task: weight} or "task:w,task:w" (config.data.tasks)
  image_scales: tuple[int, ...]
  video_scales: tuple[int, ...]
  video_frames: int
  skip_corrupt: bool
  max_skip_fraction: float
  text_dataset: str = "stdlib_text"  # Embedded text corpus mixed in as plain-text documents.
  num_epochs: int = 0  # 0 = repeat forever.
  num_packing_bins: int = 0  # 0 -> 2 * batch_size.
  tokenizer_seed: int = 0  # Seeds the k-means codebook fit.
  text_model: str = tok_lib.DEFAULT_MODEL  # SentencePiece model path.

  @classmethod
  def from_config(cls, data_cfg: Mapping | None) -> "MultimodalConfig":
    """Picks this dataclass's fields out of a ConfigDict / dict (other keys are ignored)."""
    defaults = config_lib.default_config().data
    kwargs = {}
    for f in dataclasses.fields(cls):
      value = None
      if data_cfg is not None:
        value = data_cfg.get(f.name, None) if hasattr(data_cfg, "get") else getattr(
            data_cfg, f.name, None)
      if value is None and f.name in defaults:
        value = defaults[f.name]
      if f.name == "text_model" and not value:  # config.data.text_model "": the committed one.
        value = None
      if value is not None:
        kwargs[f.name] = tuple(value) if f.name.endswith("_scales") else value
    return cls(**kwargs)

  def task_weights(self) -> dict[str, float]:
    """Validated {task: weight} with at least one positive weight."""
    tasks = self.tasks
    if isinstance(tasks, str):
      tasks = {k.strip(): float(v) for k, v in (p.split(":") for p in tasks.split(",") if p)}
    known = seq_lib.TASKS + ("text",)
    for name, w in dict(tasks).items():
      if name not in known:
        raise ValueError(f"data.tasks has task name={name!r}, which is not accepted: known tasks "
                         f"are {known}")
      if w < 0:
        raise ValueError(f"data.tasks[{name!r}]={w} is not accepted: expected a weight >= 0")
    tasks = {k: float(v) for k, v in dict(tasks).items() if v > 0}
    if not tasks:
      raise ValueError(f"data.tasks={self.tasks!r} is not accepted: expected a positive weight")
    return tasks


def default_data_dir() -> str:
  """$ERNIE5_DATA_DIR, else ~/.cache/ernie5_jax/data (kept apart from ~/tensorflow_datasets)."""
  return os.environ.get("ERNIE5_DATA_DIR") or os.path.expanduser("~/.cache/ernie5_jax/data")


class EncodedRecord:
  """One record's codes and texts (`fields`) and its memoised documents (`docs`).

  A plain object, not a dict: grain walks dict/list elements to estimate their byte
  size, which would be the pipeline's largest cost once documents are memoised.
  """
  __slots__ = ("fields", "docs")

  def __init__(self, fields: dict):
    self.fields, self.docs = fields, {}


class EncodedDigitsSource:
  """Random-access source of this shard's digits records with their codes (memoised)."""

  def __init__(self, source, indices: np.ndarray, tokenizers: tok_lib.Tokenizers,
               cfg: MultimodalConfig, *, locate=None, split: str = "train",
               skips: records.SkipCounter | None = None):
    self.skips = skips or records.SkipCounter(cfg.max_skip_fraction)
    self._source = records.GuardedSource(source, f"{cfg.dataset}:{split}", self.skips,
                                         skip=cfg.skip_corrupt, locate=locate)
    self._indices, self._tok, self._cfg = indices, tokenizers, cfg
    self._chunks: dict[int, list] = {}
    self._lock = threading.Lock()
    scales = tokenizers.image.spec.scales
    for field in ("image_scales", "video_scales"):
      want = tuple(getattr(cfg, field))
      if want != tuple(scales[:len(want)]):
        raise ValueError(f"data.{field}={want} is not accepted: expected a prefix of the image "
                         f"tokenizer's scales {tuple(scales)}")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    chunk = int(i) // _CHUNK
    with self._lock:
      if chunk not in self._chunks:
        self._chunks[chunk] = self._encode_chunk(chunk)
      return self._chunks[chunk][int(i) % _CHUNK]

  def _encode_chunk(self, chunk: int) -> list:
    idx = self._indices[chunk * _CHUNK:(chunk + 1) * _CHUNK]
    raw = [self._source[j] for j in idx]  # None: unreadable, skipped (skip_corrupt).
    ok = [r for r in raw if r is not None]
    if not ok:
      return [None] * len(raw)
    cfg, tok = self._cfg, self._tok
    n_img, n_vid = len(cfg.image_scales), len(cfg.video_scales)
    images = np.stack([r["image"] for r in ok]).astype(np.float32) / 255.0  # [n, H, W]
    image_codes = tok.image.encode(images)[:n_img]  # per scale [n, s, s]
    videos = np.stack([r["video"] for r in ok]).astype(np.float32) / 255.0  # [n, F, H, W]
    keep = np.round(np.linspace(0, videos.shape[1] - 1, cfg.video_frames)).astype(int)
    videos = videos[:, keep]
    n, f = videos.shape[:2]
    video_codes = [c.reshape(n, f, *c.shape[1:]) for c in
                   tok.image.encode(videos.reshape(n * f, *videos.shape[2:]))[:n_vid]]
    audio = np.stack([r["audio"] for r in ok]).astype(np.float32) / 32768.0  # [n, L]
    audio_codes = tok.audio.encode(audio)  # [n, T, K]
    enc = tok.text.encode
    out, k = [], 0
    for r in raw:
      if r is None:
        out.append(None)
        continue
      key = str(int(r["label"]))
      out.append(EncodedRecord({
          "label": int(r["label"]),
          "image_codes": [c[k] for c in image_codes],
          "video_codes": [[c[k, j] for c in video_codes] for j in range(f)],
          "audio_codes": audio_codes[k],
          "caption": enc(r["caption"]),
          "qa": enc(b"Q: " + r["question"] + b" A: " + r["answer"]),
          "video_caption": enc(r["video_caption"]),
          "audio_caption": enc(r["audio_caption"]),
          "audio_qa": enc("Q: which key was pressed? A: " + key),
      }))
      k += 1
    return out


class _DocsToList(grain.experimental.FlatMapTransform):
  """Passes lists of documents through, one by one (empty list: record skipped)."""
  max_fan_out = 64

  def flat_map(self, element):
    return element


@dataclasses.dataclass
class MultimodalPipeline:
  """The batch dataset plus what was built for it."""
  dataset: Any  # grain.IterDataset of batch dicts.
  layout: seq_lib.VocabularyLayout
  tokenizers: tok_lib.Tokenizers
  skips: records.SkipCounter  # Records read and skipped, per source (live counts).

  def iterator(self):
    """A fresh checkpointable iterator (get_state / set_state)."""
    return iter(self.dataset)


def make_multimodal_pipeline(data_cfg=None, *, seq_len: int, batch_size: int, seed: int,
                             process_index: int | None = None, process_count: int | None = None,
                             data_dir: str | None = None,
                             skips: records.SkipCounter | None = None) -> MultimodalPipeline:
  """Builds (on first use) the data and tokenizers and returns the batch pipeline.

  skips: where unreadable records are counted (default: a new counter, `.skips`).
  """
  import data as data_lib
  cfg = MultimodalConfig.from_config(data_cfg)
  tasks = cfg.task_weights()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  data_dir = data_dir or cfg.data_dir or default_data_dir()
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len}, batch_size={batch_size} are not accepted: expected "
                     "seq_len >= 2 and batch_size >= 1")

  tokenizers = tok_lib.ensure_tokenizers(data_dir, cfg.dataset, seed=cfg.tokenizer_seed,
                                         text_model=cfg.text_model)
  layout = seq_lib.VocabularyLayout.from_tokenizers(tokenizers)
  streams, weights = [], []
  mm_tasks = {k: v for k, v in tasks.items() if k != "text"}
  skips = skips or records.SkipCounter(cfg.max_skip_fraction)
  if mm_tasks:
    b = data_lib.ensure_built(cfg.dataset, data_dir)
    raw = b.as_data_source(cfg.split)
    shard = np.arange(len(raw))[process_index::process_count]
    src = EncodedDigitsSource(raw, shard, tokenizers, cfg,
                              locate=records.shard_locator(b, cfg.split), split=cfg.split,
                              skips=skips)
    names = list(mm_tasks)
    cum = np.cumsum([mm_tasks[k] for k in names]) / sum(mm_tasks.values())

    def to_docs(rec, rng):
      u = rng.random(2)
      task, variant = names[min(int(np.searchsorted(cum, u[0], side="right")), len(names) - 1)], \
          int(u[1] < 0.5)
      if rec is None:  # Skipped: count the task (and so the modalities) it would have made.
        skips.count_lost(f"{cfg.dataset}:{cfg.split}", task)
        return []
      # A document is a pure function of (record, task, variant): memoise it.
      if (task, variant) not in rec.docs:
        rec.docs[task, variant] = seq_lib.truncate(
            seq_lib.digits_document(task, rec.fields, layout, variant=variant), seq_len)
      return [rec.docs[task, variant]]

    mm = grain.MapDataset.source(src).shuffle(seed=seed)
    mm = mm.repeat(cfg.num_epochs or None).random_map(to_docs, seed=seed)
    streams.append(mm)
    weights.append(sum(mm_tasks.values()))
  if "text" in tasks:
    tb = data_lib.ensure_built(cfg.text_dataset, data_dir)
    guarded = records.GuardedSource(tb.as_data_source(cfg.split),
                                    f"{cfg.text_dataset}:{cfg.split}", skips,
                                    skip=cfg.skip_corrupt,
                                    locate=records.shard_locator(tb, cfg.split))
    text_src = grain.MapDataset.source(guarded)[process_index::process_count]
    enc, memo = tokenizers.text.encode, {}

    def text_docs(r):
      if r is None:  # Unreadable, skipped (counted by the guarded source).
        return []
      key = r["text"]  # Documents are a pure function of the text: memoise them.
      if key not in memo:
        memo[key] = seq_lib.text_documents(enc(key), layout, seq_len)
      return memo[key]

    text = text_src.shuffle(seed=seed + 1).repeat(cfg.num_epochs or None).map(text_docs)
    streams.append(text)
    weights.append(tasks["text"])
  docs = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights=weights)
  # Documents are cheap Python work: prefetch threads only add GIL contention.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  docs = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(read), _DocsToList())
  rows = seq_lib.pack_documents(docs, seq_len=seq_len,
                                num_packing_bins=cfg.num_packing_bins or 2 * batch_size,
                                seed=seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  return MultimodalPipeline(batches, layout, tokenizers, skips)


def make_multimodal_iterator(data_cfg=None, *, seq_len: int, batch_size: int, seed: int,
                             **kwargs):
  """Checkpointable iterator of batch dicts (contract keys + audio_codes, audio_targets)."""
  return make_multimodal_pipeline(data_cfg, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                  **kwargs).iterator()


def vocabulary_layout(data_cfg=None) -> seq_lib.VocabularyLayout:
  """The layout (so config.model.vocab_size) the pipeline uses; needs no data or fitting."""
  cfg = MultimodalConfig.from_config(data_cfg)
  image, audio = tok_lib.ImageTokenizerSpec(), tok_lib.AudioTokenizerSpec()
  text = tok_lib.text_tokenizer(cfg.text_model)
  return seq_lib.VocabularyLayout(
      text_size=text.vocab_size, image_scales=image.scales,
      image_codebook_size=image.codebook_size, audio_levels=audio.levels,
      audio_codebook_size=audio.codebook_size, pad_id=text.pad_id, eos_id=text.eos_id)


def sync_vocabulary(config):
  """Sets config's model vocabulary and audio codec (and the audio level weights) from its data.

  What every experiment on the embedded data does after choosing config.data; returns config.
  """
  layout = vocabulary_layout(config.data)
  config.model.update(vocab_size=layout.vocab_size, audio_levels=layout.audio_levels,
                      audio_codebook_size=layout.audio_codebook_size)
  config.objective.audio_level_weights = (1.0,) * (layout.audio_levels - 1)
  return config

