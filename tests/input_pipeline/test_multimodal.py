"""The multimodal grain pipeline on the tiny embedded data: fields, determinism, resume, errors."""

import numpy as np
import pytest

from ernie5_jax.input_pipeline import records
from ernie5_jax.input_pipeline import multimodal as M
from ernie5_jax.input_pipeline import sequence as S

SEQ, BATCH = 64, 4
CONTRACT = ("tokens", "targets", "loss_mask", "modality", "positions", "segment_ids", "group_ids")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  return {"data_dir": str(tmp_path_factory.getbasetemp() / "shared_data"),
          "dataset": "digits_multimodal/tiny"}


@pytest.fixture(scope="module")
def pipeline(cfg):
  return M.make_multimodal_pipeline(cfg, seq_len=SEQ, batch_size=BATCH, seed=0)


@pytest.fixture(scope="module")
def batches(pipeline):
  it = pipeline.iterator()
  return [next(it) for _ in range(12)]


def test_batch_fields(batches, pipeline):
  b = batches[0]
  assert set(CONTRACT) <= set(b) and {"audio_codes", "audio_targets"} <= set(b)
  for k in CONTRACT:
    want = (BATCH, SEQ, 3) if k == "positions" else (BATCH, SEQ)
    assert b[k].shape == want, k
    assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
  assert b["audio_codes"].shape == (BATCH, SEQ, pipeline.layout.audio_levels)
  v = pipeline.layout.vocab_size
  assert v == M.vocabulary_layout({"dataset": "digits_multimodal/tiny"}).vocab_size
  for b in batches:
    assert b["tokens"].max() < v and b["targets"].max() < v and b["tokens"].min() >= 0


def test_every_modality_has_loss(batches):
  mod = np.concatenate([b["modality"][b["loss_mask"] > 0] for b in batches])
  # Understanding-only vision (video_to_text) has no loss; images do (caption_to_image).
  assert {int(S.Modality.TEXT), int(S.Modality.IMAGE), int(S.Modality.AUDIO)} <= set(mod.tolist())
  all_mod = np.concatenate([b["modality"].ravel() for b in batches])
  assert int(S.Modality.VIDEO) in all_mod


def test_targets_are_consistent(batches, pipeline):
  """Next-token positions: targets[p] == tokens[p+1]; vision groups: targets in the next scale."""
  lay = pipeline.layout
  for b in batches:
    seg, g = b["segment_ids"], b["group_ids"]
    same = seg[:, :-1] == seg[:, 1:]
    text_like = (g[:, :-1] == 0) & (g[:, 1:] == 0) & same & (b["loss_mask"][:, :-1] > 0)
    np.testing.assert_array_equal(b["targets"][:, :-1][text_like], b["tokens"][:, 1:][text_like])
    audio_t = b["audio_targets"][..., 0]
    has = audio_t >= 0
    np.testing.assert_array_equal(audio_t[has] + lay.audio_offset, b["targets"][has])
    vis = (g > 0) & (b["loss_mask"] > 0)
    lo, hi = lay.ranges()["image"]
    assert ((b["targets"][vis] >= lo) & (b["targets"][vis] < hi)).all()


def test_same_seed_same_batches(cfg, batches):
  it = M.make_multimodal_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=0)
  for want in batches[:3]:
    got = next(it)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = next(M.make_multimodal_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=1))
  assert not np.array_equal(other["tokens"], batches[0]["tokens"])


def test_resume_from_state(pipeline, batches):
  it = pipeline.iterator()
  for _ in range(5):
    next(it)
  state = it.get_state()
  fresh = pipeline.iterator()
  fresh.set_state(state)
  for want in batches[5:8]:
    got = next(fresh)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["positions"], want["positions"])


def test_process_shards_differ(cfg):
  a = next(M.make_multimodal_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=0,
                                      process_index=0, process_count=2))
  b = next(M.make_multimodal_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=0,
                                      process_index=1, process_count=2))
  assert not np.array_equal(a["tokens"], b["tokens"])


class _Flaky:
  """A source whose record 3 cannot be read."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if i == 3:
      raise ValueError("truncated record")
    return self._source[i]


def test_corrupt_record_error_and_skip(pipeline, cfg):
  import data as data_lib
  b = data_lib.ensure_built(cfg["dataset"], cfg["data_dir"])
  src = _Flaky(b.as_data_source("train"))
  conf = M.MultimodalConfig.from_config(cfg)
  enc = M.EncodedDigitsSource(src, np.arange(len(src)), pipeline.tokenizers, conf,
                              locate=records.shard_locator(b, "train"))
  with pytest.raises(M.DataError, match=r"shard digits_multimodal-train\.array_record-00000-of-"
                                        r"00001 record 3"):
    enc[0]
  conf.skip_corrupt = True
  enc = M.EncodedDigitsSource(src, np.arange(len(src)), pipeline.tokenizers, conf)
  assert enc[3] is None and enc.skips.skipped == {f"{conf.dataset}:train": 1}
  assert enc[4].fields["image_codes"][0].shape == (1, 1)


def test_bad_config_names(cfg):
  with pytest.raises(ValueError, match="known tasks are"):
    M.MultimodalConfig.from_config({"tasks": "captions:1"}).task_weights()
  with pytest.raises(ValueError, match="known embedded datasets"):
    M.make_multimodal_pipeline({**cfg, "dataset": "mnist"}, seq_len=SEQ, batch_size=BATCH,
                               seed=0)
  with pytest.raises(ValueError, match="prefix of the image tokenizer's scales"):
    M.make_multimodal_pipeline({**cfg, "image_scales": (2, 4)}, seq_len=SEQ, batch_size=BATCH,
                               seed=0)
