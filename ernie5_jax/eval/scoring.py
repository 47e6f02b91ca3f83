"""Scores documents of the unified sequence by the model's log-likelihood of their targets.

A document (input_pipeline/sequence.py: tokens, targets, loss_mask, positions, group_ids,
optionally audio_codes) is scored by sum_p loss_mask[p] * log softmax(logits[p])[targets[p]]:
the teacher-forced log-likelihood of exactly what training puts a loss on. Multiple-choice
probes build one document per candidate continuation (same prompt, different continuation)
and take the argmax (as in the GPT-3 paper's multiple-choice evaluation, Brown et al. 2020,
arXiv 2005.14165, Sec. 2.4: compare the LM likelihood of each completion given the context).

  score = make_scorer(model)
  batch = pad_documents(docs, seq_len=64)   # one document per row
  log_likelihoods = score(batch)            # [num_docs] float32
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Fields a scoring batch carries (all [rows, seq] unless stated).
BATCH_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "group_ids",
                "audio_codes")


def pad_documents(docs: Sequence[dict[str, np.ndarray]], *, seq_len: int,
                  num_rows: int | None = None) -> dict[str, np.ndarray]:
  """Stacks documents one per row, padded to seq_len (segment 1 = the document, 0 = padding).

  Rows past len(docs) up to num_rows (default len(docs)) are all padding (zero loss mask),
  so that a fixed [num_rows, seq_len] shape compiles once.
  """
  num_rows = len(docs) if num_rows is None else num_rows
  if num_rows < len(docs):
    raise ValueError(f"num_rows={num_rows} is not accepted: expected >= the number of "
                     f"documents ({len(docs)})")
  levels = max([d["audio_codes"].shape[1] for d in docs if "audio_codes" in d], default=1)
  batch = {"tokens": np.zeros((num_rows, seq_len), np.int32),
           "targets": np.zeros((num_rows, seq_len), np.int32),
           "loss_mask": np.zeros((num_rows, seq_len), np.float32),
           "positions": np.zeros((num_rows, seq_len, 3), np.int32),
           "segment_ids": np.zeros((num_rows, seq_len), np.int32),
           "group_ids": np.zeros((num_rows, seq_len), np.int32),
           "audio_codes": np.full((num_rows, seq_len, levels), -1, np.int32)}
  for i, doc in enumerate(docs):
    n = len(doc["tokens"])
    if n > seq_len:
      raise ValueError(f"document {i} has {n} positions, more than seq_len={seq_len}: pass a "
                       "larger seq_len")
    for k in ("tokens", "targets", "loss_mask", "positions", "group_ids"):
      batch[k][i, :n] = doc[k]
    if "audio_codes" in doc:
      batch["audio_codes"][i, :n, :doc["audio_codes"].shape[1]] = doc["audio_codes"]
    batch["segment_ids"][i, :n] = 1
  return batch


def token_log_likelihoods(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, float32: logits [batch, seq, vocab], targets -> [batch, seq]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, seq, vocab]
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_log_likelihoods(logits: jax.Array, targets: jax.Array,
                             mask: jax.Array) -> jax.Array:
  """Masked sum of token log-likelihoods per row: logits, targets, mask -> [batch]."""
  ll = token_log_likelihoods(logits, targets)  # [batch, seq]
  return jnp.sum(jnp.where(mask > 0, ll, 0.0), axis=-1)


def make_scorer(model: nnx.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """Returns a jitted batch -> [rows] summed log-likelihood of the targets under loss_mask.

  The model is called as in training (Decoder(tokens, positions, segment_ids, group_ids,
  audio_codes)); its state is captured once, so later changes to `model` are not seen.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def score(state, batch):
    m = nnx.merge(graphdef, state)
    logits, _ = m(batch["tokens"], batch["positions"], batch["segment_ids"],
                  batch["group_ids"], batch.get("audio_codes"))  # [rows, seq, vocab]
    return sequence_log_likelihoods(logits, batch["targets"], batch["loss_mask"])

  def run(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(score(state, {k: jnp.asarray(v) for k, v in batch.items()
                                    if k in BATCH_FIELDS}))
  return run
