"""Input pipelines: grain datasets yielding the unified-sequence batch dict.

A batch (DESIGN.md, "The unified sequence") holds, per row of this process's
share of the global batch:
  tokens, targets int32 [batch, seq]; loss_mask float32 [batch, seq];
  modality int32 [batch, seq] (index into MODALITIES);
  positions int32 [batch, seq, 3] (t, h, w); segment_ids, group_ids int32 [batch, seq].
The embedded multimodal source adds audio_codes and audio_targets int32 [batch, seq, K]
(sequence.py); the objective reads them when present.

config.data.source picks the source:
  "synthetic"          synthetic.py: no files; order from data.shuffle_seed.
  "digits_multimodal"  multimodal.py: data/digits_multimodal + stdlib_text, built with the
                       tokenizers into data.data_dir on first use; records sharded per process.
  "digits_sft"         sft.py: instruction SFT documents of the verifiable task families
                       (config.rl.families), loss on the reference answer only.
  "tfds:NAME", "seqio:NAME"  seqio_tasks.make_text_pipeline: text only.
Each process reads global_batch_size / process_count rows of every batch; the iterator
state (get_state / set_state) is saved in the checkpoint, so a resumed run reads on
exactly where it stopped.
"""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import ml_collections

from ernie5_jax import config as config_lib
from ernie5_jax.input_pipeline import records
from ernie5_jax.input_pipeline import synthetic

# Modality ids in batch["modality"], in order; metrics use these names.
MODALITIES = ("text", "image", "video", "audio")


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows each process reads of every global batch."""
  if global_batch_size % process_count:
    raise ValueError(
        f"config.data.global_batch_size={global_batch_size} is not accepted: expected a "
        f"multiple of the process count ({process_count})")
  return global_batch_size // process_count


def create_dataset(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                   process_count: int | None = None, skips: records.SkipCounter | None = None
                   ) -> grain.MapDataset | grain.IterDataset:
  """Returns this process's dataset of batches for config.data.source (building files once).

  skips: where the file-backed sources count records they skip (data.skip_corrupt).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = config.data
  shard = dict(process_index=process_index, process_count=process_count)
  local = local_batch_size(d.global_batch_size, process_count)
  if d.source == "digits_multimodal":
    from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
    return multimodal.make_multimodal_pipeline(d, seq_len=d.seq_len, batch_size=local,
                                               seed=d.shuffle_seed, skips=skips,
                                               **shard).dataset
  if d.source == "digits_sft":
    from ernie5_jax.input_pipeline import sft  # pylint: disable=g-import-not-at-top
    return sft.sft_dataset(config, split=d.get("split", "train"), batch_size=local,
                           seq_len=d.seq_len, seed=d.shuffle_seed,
                           families={f: 1.0 for f in config.rl.families}, **shard)
  if d.source.startswith(("tfds:", "seqio:")):
    from ernie5_jax.input_pipeline import multimodal, seqio_tasks  # pylint: disable=g-import-not-at-top
    return seqio_tasks.make_text_pipeline(
        d.source, seq_len=d.seq_len, batch_size=local, seed=d.shuffle_seed,
        data_dir=d.data_dir or multimodal.default_data_dir(), split=d.get("split", "train"),
        text_model=multimodal.MultimodalConfig.from_config(d).text_model,
        skip_corrupt=d.skip_corrupt, skips=skips, **shard)
  if d.source != "synthetic":
    raise ValueError(f"config.data.source={d.source!r} is not accepted: expected 'synthetic', "
                     "'digits_multimodal', 'digits_sft', 'tfds:NAME' or 'seqio:NAME'")
  return synthetic.make_dataset(
      seq_len=d.seq_len, vocab_size=config.model.vocab_size,
      num_modalities=d.num_modalities, seed=config.seed, shuffle_seed=d.shuffle_seed,
      local_batch_size=local_batch_size(d.global_batch_size, process_count),
      process_index=process_index, process_count=process_count)


def validate(config: ml_collections.ConfigDict) -> None:
  """config_lib.validate, then the model's vocabulary and audio codec against the data's.

  The data check builds nothing (it reads the tokenizers' specs); every job that feeds the
  model data runs it before anything compiles. Raises ConfigError naming the field.
  """
  config_lib.validate(config)
  if config.data.source == "synthetic":
    return
  # Imported here: the file-backed sources' modules pull grain and the tokenizers.
  from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
  from ernie5_jax.input_pipeline import tokenizers  # pylint: disable=g-import-not-at-top
  d, m = config.data, config.model
  if d.get("text_model") and not os.path.isfile(d.text_model):
    config_lib.fail("data.text_model", d.text_model,
                    "expected a SentencePiece model file, or '' (the committed tokenizer)")
  try:
    layout = multimodal.vocabulary_layout(d)
    if d.source == "digits_multimodal":
      multimodal.MultimodalConfig.from_config(d).task_weights()
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{e}" if str(e).startswith("data.") else str(e)) from e
  if d.source in ("digits_multimodal", "digits_sft"):
    scales = tuple(tokenizers.ImageTokenizerSpec().scales)
    for field in ("image_scales", "video_scales"):
      want = tuple(d[field])
      if not want or want != scales[:len(want)]:
        config_lib.fail(f"data.{field}", want,
                        f"expected a prefix of the image tokenizer's scales {scales}")
  if d.get("text_model") and d.source.startswith(config_lib.TEXT_SOURCE_PREFIXES):
    # A checkpoint's own tokenizer (ernie5_jax/interop): text ids only, below its piece count.
    pieces = tokenizers.text_tokenizer(d.text_model).vocab_size
    if m.vocab_size < pieces:
      config_lib.fail("model.vocab_size", m.vocab_size,
                      f"expected >= {pieces}, the pieces of data.text_model={d.text_model!r}: "
                      "the model's vocabulary does not hold the data's")
    return
  if m.vocab_size != layout.vocab_size:
    config_lib.fail("model.vocab_size", m.vocab_size,
                    f"expected the data's vocabulary size {layout.vocab_size} "
                    f"(data.source={d.source!r}); experiments set it with "
                    "input_pipeline.multimodal.sync_vocabulary(config)")
  if m.audio_levels > layout.audio_levels:
    config_lib.fail("model.audio_levels", m.audio_levels,
                    f"expected 1..{layout.audio_levels} (the data's audio codec levels)")
  if m.audio_levels > 1 and m.audio_codebook_size != layout.audio_codebook_size:
    config_lib.fail("model.audio_codebook_size", m.audio_codebook_size,
                    f"expected the data's audio codebook size {layout.audio_codebook_size}")


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's fields (module doc) as jax.ShapeDtypeStruct: for compiling without data."""
  b, s = config.data.global_batch_size, config.data.seq_len
  spec = {name: jax.ShapeDtypeStruct((b, s), jnp.int32)
          for name in ("tokens", "targets", "modality", "segment_ids", "group_ids")}
  spec["loss_mask"] = jax.ShapeDtypeStruct((b, s), jnp.float32)
  spec["positions"] = jax.ShapeDtypeStruct((b, s, 3), jnp.int32)
  if config.data.source in ("digits_multimodal", "digits_sft"):  # The sources with audio.
    levels = (b, s, config.model.audio_levels)
    spec["audio_codes"] = spec["audio_targets"] = jax.ShapeDtypeStruct(levels, jnp.int32)
  return spec


def create_train_iterator(config: ml_collections.ConfigDict, **kwargs) -> grain.DatasetIterator:
  """Returns a checkpointable grain iterator (get_state/set_state) over training batches."""
  ds = create_dataset(config, **kwargs)
  if isinstance(ds, grain.IterDataset):  # Packed sources: already an iterator pipeline.
    return iter(ds)
  # One reader thread keeps the batch order and the CPU cost predictable.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read))
