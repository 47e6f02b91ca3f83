"""seqio registry of the text tasks, and a text pipeline from any TFDS dataset or seqio mixture.

Registered (by `register_tasks(data_dir)`; idempotent):
  "ernie5_stdlib_text"     task: data/stdlib_text (TFDS) -> "targets" with the committed
                           SentencePiece vocabulary, EOS appended.
  "ernie5_text_mixture"    mixture of the text tasks above (rate 1 each).

Training on a named source (`make_text_pipeline(source, ...)`), source is one of
  "tfds:NAME[/CONFIG][:VERSION]"  a TFDS dataset prepared as ArrayRecord under data_dir
                                  (an embedded name from data/ is built on first use);
                                  the text is feature `text_feature` (default "text").
  "seqio:NAME"                    a registered seqio task or mixture; its "targets"
                                  feature (already tokenized by seqio) is used.
Both yield packed batches in the unified-sequence layout (all text: modality 0,
group 0, no audio codes) from the same packer as the multimodal pipeline, and a
checkpointable iterator: TFDS sources are random access (grain shuffle, exact
resume); seqio datasets are tf.data streams, resumed by replaying the seeded stream
and skipping the examples already consumed.
"""

from __future__ import annotations

import functools

import grain
import jax
import numpy as np

from ernie5_jax.input_pipeline import records
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline.tokenizers import text as text_lib

STDLIB_TASK = "ernie5_stdlib_text"
TEXT_MIXTURE = "ernie5_text_mixture"


def register_tasks(data_dir: str, text_model: str = text_lib.DEFAULT_MODEL) -> list[str]:
  """Builds stdlib_text if needed and registers the seqio tasks / mixture; returns their names."""
  import seqio
  import data as data_lib
  data_lib.ensure_built("stdlib_text", data_dir)  # Also registers the builder class with TFDS.
  if STDLIB_TASK not in seqio.TaskRegistry.names():
    vocab = text_lib.seqio_vocabulary(text_model)
    seqio.TaskRegistry.add(
        STDLIB_TASK,
        # seqio's TfdsDataSource reads through tf.data, which TFDS does not offer for
        # ArrayRecord: read the random-access source through a FunctionDataSource.
        source=seqio.FunctionDataSource(
            functools.partial(_array_record_text_dataset, name="stdlib_text", data_dir=data_dir),
            splits=("train", "test")),
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
  if TEXT_MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(TEXT_MIXTURE, [(STDLIB_TASK, 1.0)])
  return [STDLIB_TASK, TEXT_MIXTURE]


def _array_record_text_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                               name: str, data_dir: str):
  """tf.data.Dataset of {"text"} from an embedded ArrayRecord dataset (seqio dataset_fn)."""
  import tensorflow as tf
  import data as data_lib
  src = data_lib.ensure_built(name, data_dir).as_data_source(split)

  def records():
    order = np.arange(len(src))
    if shuffle_files:
      np.random.default_rng(seed or 0).shuffle(order)
    for i in order:
      yield {"text": src[int(i)]["text"]}
  return tf.data.Dataset.from_generator(
      records, output_signature={"text": tf.TensorSpec([], tf.string)})


class _ReplayIterator(grain.DatasetIterator):
  """Iterator over a seeded tf.data stream; state = examples consumed (resume replays)."""

  def __init__(self, make_stream):
    super().__init__()
    self._make_stream, self._it, self._consumed = make_stream, None, 0

  def __next__(self):
    if self._it is None:
      self._it = self._make_stream()
      for _ in range(self._consumed):
        next(self._it)
    x = next(self._it)
    self._consumed += 1
    return x

  def get_state(self):
    return {"consumed": self._consumed}

  def set_state(self, state):
    self._consumed, self._it = int(state["consumed"]), None


class _ReplayDataset(grain.IterDataset):
  """grain IterDataset over a function returning a fresh, deterministic iterator."""

  def __init__(self, make_stream):
    super().__init__()
    self._make_stream = make_stream

  def __iter__(self):
    return _ReplayIterator(self._make_stream)


def make_text_pipeline(source: str, *, seq_len: int, batch_size: int, seed: int, data_dir: str,
                       split: str = "train", text_feature: str = "text",
                       text_model: str = text_lib.DEFAULT_MODEL,
                       process_index: int | None = None, process_count: int | None = None,
                       skip_corrupt: bool = False, skips: records.SkipCounter | None = None):
  """grain IterDataset of packed text batches from "tfds:NAME" or "seqio:NAME" (module doc).

  tfds: records that cannot be read raise DataError naming them, or with skip_corrupt are
  skipped and counted in skips (records.py).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  tok = text_lib.text_tokenizer(text_model)
  layout = seq_lib.VocabularyLayout(text_size=tok.vocab_size, pad_id=tok.pad_id,
                                    eos_id=tok.eos_id)
  kind, _, name = source.partition(":")
  if kind == "tfds" and name:
    src = records.GuardedSource(_tfds_source(name, split, data_dir), f"tfds:{name}:{split}",
                                skips, skip=skip_corrupt)
    ds = grain.MapDataset.source(src)[process_index::process_count].shuffle(seed=seed).repeat()

    def to_docs(rec):
      if rec is None:  # Unreadable, skipped and counted.
        return []
      if text_feature not in rec:
        raise ValueError(f"text_feature={text_feature!r} is not accepted for {source}: the "
                         f"features are {sorted(rec)}")
      return seq_lib.text_documents(tok.encode(rec[text_feature]), layout, seq_len)
    docs = ds.map(to_docs).to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                             prefetch_buffer_size=0))
  elif kind == "seqio" and name:
    import seqio
    register_tasks(data_dir, text_model)
    try:
      task = seqio.get_mixture_or_task(name)
    except ValueError as e:
      known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
      raise ValueError(f"seqio name={name!r} is not accepted: known tasks and mixtures are "
                       f"{known}") from e

    def stream():
      ds = task.get_dataset(sequence_length=None, split=split, shuffle=True, seed=seed,
                            num_epochs=None, shard_info=seqio.ShardInfo(process_index,
                                                                        process_count))
      for ex in ds.as_numpy_iterator():
        ids = np.asarray(ex["targets"], np.int32)
        if len(ids) and ids[-1] == tok.eos_id:
          ids = ids[:-1]  # The packer appends EOS as the last target itself.
        if len(ids) and ids.max() >= tok.vocab_size:
          raise ValueError(f"seqio {name!r} has token id {ids.max()} >= the text vocabulary "
                           f"size {tok.vocab_size}: use a task with the text_model vocabulary")
        yield seq_lib.text_documents(ids, layout, seq_len)
    docs = _ReplayDataset(stream)
  else:
    raise ValueError(f"source={source!r} is not accepted: expected 'tfds:NAME[/CONFIG]' or "
                     "'seqio:NAME'")
  from ernie5_jax.input_pipeline.multimodal import _DocsToList
  docs = grain.experimental.FlatMapIterDataset(docs, _DocsToList())
  rows = seq_lib.pack_documents(docs, seq_len=seq_len, num_packing_bins=2 * batch_size, seed=seed)
  return rows.batch(batch_size, drop_remainder=True)


def _tfds_source(name: str, split: str, data_dir: str):
  """Random-access ArrayRecord source of a TFDS dataset (embedded ones are built first)."""
  import tensorflow_datasets as tfds
  import data as data_lib
  base = name.split(":")[0]
  if base.split("/")[0] in data_lib.KNOWN_DATASETS:
    return data_lib.ensure_built(base, data_dir).as_data_source(split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # Unknown name, or not prepared as ArrayRecord under data_dir.
    raise ValueError(f"TFDS name={name!r} could not be opened under data_dir={data_dir!r} "
                     f"({type(e).__name__}: {e}); embedded datasets are "
                     f"{sorted(data_lib.KNOWN_DATASETS)}, others must be prepared with "
                     "file_format='array_record'") from e
