"""Tests of the synthetic grain pipeline: layout, determinism, sharding, iterator state."""

import collections

import numpy as np
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.input_pipeline import synthetic

SEQ, VOCAB = 32, 128


def _source(**kw):
  args = dict(seq_len=SEQ, vocab_size=VOCAB, num_modalities=2, seed=0)
  args.update(kw)
  return synthetic.SyntheticSource(**args)


def _config(batch=8, **data):
  config = config_lib.default_config()
  config.model.vocab_size = VOCAB
  config.data.update(seq_len=SEQ, global_batch_size=batch, **data)
  return config


def test_example_is_a_pure_function_of_seed_and_index():
  a, b = _source(), _source()
  for i in (0, 7, 123_456):
    for key, value in a[i].items():
      np.testing.assert_array_equal(value, b[i][key])
  assert not np.array_equal(a[0]["tokens"], _source(seed=1)[0]["tokens"])
  assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])


def test_layout_matches_the_batch_contract():
  src = _source()
  saw_image = False
  for i in range(200):
    ex = src[i]
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
        "tokens": ((SEQ,), np.int32), "targets": ((SEQ,), np.int32),
        "loss_mask": ((SEQ,), np.float32), "modality": ((SEQ,), np.int32),
        "positions": ((SEQ, 3), np.int32), "segment_ids": ((SEQ,), np.int32),
        "group_ids": ((SEQ,), np.int32)}
    seg = ex["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and seg[-1] in (2, 3)  # 2-3 docs
    assert np.all((ex["tokens"] >= 0) & (ex["tokens"] < VOCAB))
    text = ex["modality"] == synthetic.MODALITY_TEXT
    np.testing.assert_array_equal(ex["group_ids"][text], 0)
    assert np.all(ex["tokens"][text] < VOCAB // 2) and np.all(ex["tokens"][~text] >= VOCAB // 2)
    for s in np.unique(seg):
      idx = np.flatnonzero(seg == s)
      assert ex["loss_mask"][idx[-1]] == 0  # nothing to predict past a document's end
      doc_text = idx[text[idx]]
      # Text: t = h = w = index in the document; targets are the next token.
      np.testing.assert_array_equal(ex["positions"][doc_text], (doc_text - idx[0])[:, None]
                                    * np.ones(3, np.int32))
      live = doc_text[ex["loss_mask"][doc_text] == 1]
      np.testing.assert_array_equal(ex["targets"][live], ex["tokens"][live + 1])
    groups = [g for g in np.unique(ex["group_ids"]) if g]
    for g in groups:
      idx = np.flatnonzero(ex["group_ids"] == g)
      saw_image = True
      assert len(idx) == 4 and np.all(np.diff(idx) == 1)  # one contiguous 2x2 group
      assert np.all(ex["modality"][idx] == synthetic.MODALITY_IMAGE)
      nxt = np.flatnonzero(ex["group_ids"] == g + 1)
      if len(nxt) and ex["segment_ids"][nxt[0]] == ex["segment_ids"][idx[0]]:
        # Next-group targets: slot j predicts slot j of the following group.
        np.testing.assert_array_equal(ex["targets"][idx], ex["tokens"][nxt])
        np.testing.assert_array_equal(ex["loss_mask"][idx], 1)
      else:
        np.testing.assert_array_equal(ex["loss_mask"][idx], 0)
  assert saw_image


def test_text_only_when_one_modality():
  src = _source(num_modalities=1)
  for i in range(50):
    assert not src[i]["group_ids"].any() and not src[i]["modality"].any()


def test_data_is_learnable_from_the_previous_token():
  """A bigram table predicts most text targets: the loss has somewhere to fall to."""
  src = _source(num_modalities=1, vocab_size=512)
  pairs = collections.Counter()
  rows = [src[i] for i in range(1500)]
  for ex in rows:
    live = ex["loss_mask"] == 1
    pairs.update(zip(ex["tokens"][live].tolist(), ex["targets"][live].tolist()))
  best = {}
  for (tok, tgt), n in pairs.items():
    if n > best.get(tok, (0, None))[0]:
      best[tok] = (n, tgt)
  hits = sum(n for n, _ in best.values())
  assert hits / sum(pairs.values()) > 0.4  # uniform guessing: ~1/512


def test_batches_and_iterator_state_round_trip():
  it = input_pipeline.create_train_iterator(_config())
  first = next(it)
  assert first["tokens"].shape == (8, SEQ) and first["positions"].shape == (8, SEQ, 3)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = input_pipeline.create_train_iterator(_config())
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_slices_of_the_same_global_batch():
  config = _config(batch=4)
  whole = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  parts = [input_pipeline.create_train_iterator(config, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(3):
    global_batch = next(whole)
    local = [next(p) for p in parts]
    assert local[0]["tokens"].shape == (2, SEQ)
    np.testing.assert_array_equal(
        np.concatenate([b["tokens"] for b in local]), global_batch["tokens"])


def test_global_batch_must_split_over_processes():
  with pytest.raises(ValueError, match=r"config.data.global_batch_size=5 .*process count \(2\)"):
    input_pipeline.create_dataset(_config(batch=5), process_index=0, process_count=2)


def test_shuffle_seed_changes_the_order_not_the_examples():
  a = next(input_pipeline.create_train_iterator(_config()))["tokens"]
  b = next(input_pipeline.create_train_iterator(_config(shuffle_seed=1)))["tokens"]
  assert not np.array_equal(a, b)
