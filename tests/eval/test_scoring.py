"""Tests for eval/scoring.py against a naive per-position numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.eval import scoring
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.model import Decoder

LAYOUT = seq_lib.VocabularyLayout(text_size=32, image_scales=(1, 2), image_codebook_size=4,
                                  audio_levels=2, audio_codebook_size=4)
SEQ = 24  # The one padded length the model tests compile (plus SEQ + 8 once).


def _naive_score(logits, targets, mask):
  """sum_p mask[p] * log softmax(logits[p])[targets[p]], one row and position at a time."""
  logits = np.asarray(logits, np.float64)
  out = []
  for b in range(logits.shape[0]):
    total = 0.0
    for p in range(logits.shape[1]):
      if mask[b, p] > 0:
        z = logits[b, p] - logits[b, p].max()
        total += z[targets[b, p]] - np.log(np.exp(z).sum())
    out.append(total)
  return np.array(out)


def _documents():
  """Two image->caption documents (the probe's layout) and one plain text document."""
  rng = np.random.default_rng(0)
  image = [[rng.integers(0, 4, (1, 1)), rng.integers(0, 4, (2, 2))]]  # One frame, 2 scales.
  docs = [seq_lib.DocumentWriter(LAYOUT).vision(image, seq_lib.Modality.IMAGE, generate=False)
          .text(np.array(caption, np.int32)).finish() for caption in ([5, 6, 7], [5, 9])]
  docs.append(seq_lib.text_documents(np.array([3, 4, 8, 10], np.int32), LAYOUT, 16)[0])
  return docs


@pytest.fixture(scope="module")
def model():
  """A tiny Decoder on LAYOUT's vocabulary with numpy-drawn parameters (no init compile)."""
  cfg = config_lib.default_config()
  cfg.model.update(dict(
      vocab_size=LAYOUT.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=16, rope_sections=(4, 2, 2), num_dense_layers=1, dense_hidden=32,
      num_experts=4, num_shared_experts=0, expert_hidden=16, top_k=2,
      audio_levels=LAYOUT.audio_levels, audio_codebook_size=LAYOUT.audio_codebook_size))
  cfg.objective.audio_level_weights = (1.0,) * (LAYOUT.audio_levels - 1)
  config_lib.validate(cfg)
  abstract = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), params)
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
  return nnx.merge(graphdef, params, rest)


def test_sequence_log_likelihoods_matches_naive():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3  # [batch, seq, vocab]
  targets = rng.integers(0, 7, (3, 5)).astype(np.int32)
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  mask[2] = 0.0  # An all-padding row scores 0.
  got = scoring.sequence_log_likelihoods(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(mask))
  np.testing.assert_allclose(got, _naive_score(logits, targets, mask), rtol=1e-5, atol=1e-5)
  assert float(got[2]) == 0.0


def test_pad_documents_layout():
  docs = _documents()
  batch = scoring.pad_documents(docs, seq_len=SEQ, num_rows=4)
  assert batch["tokens"].shape == (4, SEQ) and batch["positions"].shape == (4, SEQ, 3)
  for i, doc in enumerate(docs):
    n = len(doc["tokens"])
    np.testing.assert_array_equal(batch["tokens"][i, :n], doc["tokens"])
    np.testing.assert_array_equal(batch["loss_mask"][i, :n], doc["loss_mask"])
    np.testing.assert_array_equal(batch["segment_ids"][i], (np.arange(SEQ) < n).astype(int))
  assert batch["loss_mask"][3].sum() == 0 and batch["segment_ids"][3].sum() == 0
  # An understood image carries no loss: only the caption (EOI -> first word ... -> EOS) is scored.
  assert batch["loss_mask"][0].sum() == 3 + 1
  with pytest.raises(ValueError, match="seq_len=4"):
    scoring.pad_documents(docs, seq_len=4)
  with pytest.raises(ValueError, match="num_rows=1"):
    scoring.pad_documents(docs, seq_len=SEQ, num_rows=1)


def test_make_scorer_matches_naive_and_ignores_padding(model):
  docs = _documents()
  batch = scoring.pad_documents(docs, seq_len=SEQ, num_rows=4)
  got = scoring.make_scorer(model)(batch)
  logits, _ = model(*(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids",
                                                      "group_ids")),
                    jnp.asarray(batch["audio_codes"]))
  np.testing.assert_allclose(got, _naive_score(logits, batch["targets"], batch["loss_mask"]),
                             rtol=1e-4, atol=1e-4)
  assert got[3] == 0.0
  # A document's score does not depend on its row's padding length or on the other rows.
  alone = scoring.make_scorer(model)(scoring.pad_documents(docs[1:2], seq_len=SEQ + 8))
  np.testing.assert_allclose(alone[0], got[1], rtol=1e-4, atol=1e-4)
