"""Input pipelines: grain datasets yielding the unified-sequence batch dict.

A batch (DESIGN.md, "The unified sequence") holds, per row of this process's
share of the global batch:
  tokens, targets int32 [batch, seq]; loss_mask float32 [batch, seq];
  modality int32 [batch, seq] (index into MODALITIES);
  positions int32 [batch, seq, 3] (t, h, w); segment_ids, group_ids int32 [batch, seq].
"""

from __future__ import annotations

import grain
import jax
import ml_collections

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
                   process_count: int | None = None) -> grain.MapDataset:
  """Returns this process's dataset of batches for config.data.source."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = config.data
  if d.source != "synthetic":
    raise ValueError(f"config.data.source={d.source!r} is not accepted: expected 'synthetic'")
  return synthetic.make_dataset(
      seq_len=d.seq_len, vocab_size=config.model.vocab_size,
      num_modalities=d.num_modalities, seed=config.seed, shuffle_seed=d.shuffle_seed,
      local_batch_size=local_batch_size(d.global_batch_size, process_count),
      process_index=process_index, process_count=process_count)


def create_train_iterator(config: ml_collections.ConfigDict, **kwargs) -> grain.DatasetIterator:
  """Returns a checkpointable grain iterator (get_state/set_state) over training batches."""
  ds = create_dataset(config, **kwargs)
  # One reader thread keeps the batch order and the CPU cost predictable.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read))
