"""Unified sequence: vocabulary layout, per-modality targets / masks / positions, packing."""

import grain
import numpy as np
import pytest

from ernie5_jax.input_pipeline import sequence as S

L = S.VocabularyLayout(text_size=100, image_scales=(1, 2, 4), image_codebook_size=10,
                       audio_levels=3, audio_codebook_size=20)
SOS, BOI, EOI = L.special("SOS"), L.special("BOI"), L.special("EOI")


def _record(rng=np.random.default_rng(0)):
  return {
      "image_codes": [rng.integers(0, 10, (s, s)) for s in (1, 2, 4)],
      "video_codes": [[rng.integers(0, 10, (s, s)) for s in (1, 2)] for _ in range(3)],
      "audio_codes": rng.integers(0, 20, (5, 3)),
      "caption": np.array([5, 6, 7]), "qa": np.array([8, 9]), "video_caption": np.array([11]),
      "audio_caption": np.array([12, 13]), "audio_qa": np.array([14]),
  }


def test_layout_ranges_and_vocab_size():
  assert L.image_code_offset(0) == 100 and L.image_code_offset(2) == 120
  assert L.audio_offset == 130 and L.special_offset == 150
  assert L.vocab_size == 150 + len(S.SPECIALS)
  starts = sorted(L.ranges().values())
  assert all(a[1] == b[0] for a, b in zip(starts, starts[1:]))
  with pytest.raises(ValueError, match="expected one of"):
    L.special("BOS")
  assert S.VocabularyLayout().vocab_size == 1024 + 4 * 64 + 128 + len(S.SPECIALS)


def test_text_document():
  doc = S.DocumentWriter(L).text(np.array([3, 4, 5])).finish()
  np.testing.assert_array_equal(doc["tokens"], [3, 4, 5])
  np.testing.assert_array_equal(doc["targets"], [4, 5, L.eos_id])
  np.testing.assert_array_equal(doc["loss_mask"], 1)
  np.testing.assert_array_equal(doc["positions"], [[0] * 3, [1] * 3, [2] * 3])
  assert not doc["group_ids"].any() and not doc["modality"].any()
  assert (doc["audio_codes"] == -1).all()


def _naive_generation(rec):
  """Expected (token, target, mask, group, (t, h, w)) rows of caption_to_image."""
  rows, r = [], 0
  cap = rec["caption"]
  for i, t in enumerate(cap):
    rows.append((t, cap[i + 1] if i + 1 < len(cap) else BOI, 1, 0, (r, r, r)))
    r += 1
  rows.append((BOI, SOS, 0, 0, (r, r, r)))
  base, top, group = r + 1, 4, 0
  maps = rec["image_codes"]
  for k, s in enumerate((1, 2, 4)):
    group += 1
    for i in range(s):
      for j in range(s):
        parent = maps[k - 1][i // 2, j // 2] if k else 0  # Scales double: parent cell = half.
        tok = SOS if k == 0 else parent + 100 + 10 * (k - 1)
        pos = (base, base + int((i + 0.5) * top / s), base + int((j + 0.5) * top / s))
        rows.append((tok, maps[k][i, j] + 100 + 10 * k, 1, group, pos))
  r = base + 4
  rows.append((EOI, L.eos_id, 1, 0, (r, r, r)))
  return rows


def test_caption_to_image_matches_naive_reference():
  rec = _record()
  doc = S.digits_document("caption_to_image", rec, L)
  want = _naive_generation(rec)
  got = list(zip(doc["tokens"], doc["targets"], doc["loss_mask"], doc["group_ids"],
                 map(tuple, doc["positions"])))
  assert len(got) == len(want) == 3 + 1 + 21 + 1
  for g, w in zip(got, want):
    assert tuple(int(x) if np.ndim(x) == 0 else tuple(int(y) for y in x) for x in g) == w
  np.testing.assert_array_equal(doc["modality"], [0] * 3 + [1] * 22 + [0])


def test_generation_groups_never_see_their_targets():
  """Inside each group, no input token equals-by-position a target of that group."""
  doc = S.digits_document("caption_to_image", _record(), L)
  g = doc["group_ids"]
  for gid in range(1, g.max() + 1):
    sel = np.nonzero(g == gid)[0]
    # Inputs of group k are scale k-1 ids (or SOS); targets are scale k ids: disjoint ranges.
    tok_scale = set(((doc["tokens"][sel] - 100) // 10).tolist())
    tgt_scale = set(((doc["targets"][sel] - 100) // 10).tolist())
    assert not tok_scale & tgt_scale


def test_image_to_caption_has_no_loss_inside_the_image():
  rec = _record()
  doc = S.digits_document("image_to_caption", rec, L, variant=1)
  n_img = 1 + 21  # BOI + codes
  assert doc["tokens"][0] == BOI and doc["tokens"][n_img] == EOI
  np.testing.assert_array_equal(doc["loss_mask"][:n_img], 0)
  np.testing.assert_array_equal(doc["tokens"][1:2], rec["image_codes"][0].reshape(-1) + 100)
  np.testing.assert_array_equal(doc["targets"][n_img:], [8, 9, L.eos_id])  # EOI -> qa -> EOS
  np.testing.assert_array_equal(doc["loss_mask"][n_img:], 1)
  np.testing.assert_array_equal(np.unique(doc["group_ids"][1:n_img]), [1, 2, 3])


def test_video_positions_use_frame_time():
  rec = _record()
  doc = S.digits_document("video_to_text", rec, L)
  vis = doc["modality"] == S.Modality.VIDEO
  pos = doc["positions"][vis][1:]  # Skip BOV.
  base = 1
  np.testing.assert_array_equal(np.unique(pos[:, 0]), base + np.arange(3))
  assert pos[:, 1:].min() >= base and pos[:, 1:].max() < base + 2
  assert doc["positions"][~vis][0, 0] == base + 3  # EOV after max(frames=3, top=2).
  assert doc["group_ids"].max() == 3 * 2


def test_audio_fields():
  rec = _record()
  doc = S.digits_document("text_to_audio", rec, L)
  codes = rec["audio_codes"]
  boa = int(np.nonzero(doc["tokens"] == L.special("BOA"))[0][0])
  frames = slice(boa + 1, boa + 6)
  np.testing.assert_array_equal(doc["tokens"][frames], codes[:, 0] + L.audio_offset)
  np.testing.assert_array_equal(doc["audio_codes"][frames], codes)
  np.testing.assert_array_equal(doc["audio_targets"][boa:boa + 5], codes)
  assert (doc["audio_targets"][boa + 5:] == -1).all() and (doc["audio_codes"][:boa + 1] == -1).all()
  np.testing.assert_array_equal(doc["targets"][boa:boa + 5], codes[:, 0] + L.audio_offset)
  assert doc["targets"][boa + 5] == L.special("EOA")
  assert doc["targets"][boa - 1] == L.special("BOA") and doc["loss_mask"][boa - 1] == 1
  np.testing.assert_array_equal(doc["modality"][boa:boa + 6], S.Modality.AUDIO)
  np.testing.assert_array_equal(doc["positions"][:, 0], np.arange(len(doc["tokens"])))


def test_unknown_task_lists_known():
  with pytest.raises(ValueError, match="caption_to_image"):
    S.digits_document("captioning", _record(), L)


def test_text_split_and_truncate():
  docs = S.text_documents(np.arange(3, 13), L, max_len=4)
  assert [len(d["tokens"]) for d in docs] == [4, 4, 2]
  np.testing.assert_array_equal(docs[1]["positions"][:, 0], np.arange(4))  # Restarted.
  doc = S.truncate(S.digits_document("caption_to_image", _record(), L), 10)
  assert all(len(v) == 10 for v in doc.values())


def test_packing_rows():
  rec = _record()
  docs = [S.digits_document(t, rec, L) for t in ("caption_to_image", "image_to_caption",
                                                  "audio_to_text")]
  docs += S.text_documents(np.arange(3, 9), L, 32)
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  rows = list(S.pack_documents(ds, seq_len=32, num_packing_bins=4))
  seen = 0
  for row in rows:
    assert row["tokens"].shape == (32,) and row["positions"].shape == (32, 3)
    seg = row["segment_ids"]
    pad = seg == 0
    assert (row["loss_mask"][pad] == 0).all() and (row["audio_codes"][pad] == -1).all()
    for s in np.unique(seg[~pad]):
      sel = seg == s
      assert np.all(np.diff(np.nonzero(sel)[0]) == 1)  # Contiguous.
      assert row["positions"][sel][0, 0] == 0  # Restarted.
      seen += 1
    groups = row["group_ids"][row["group_ids"] > 0]
    for g in np.unique(groups):  # Row-unique: one segment per group id.
      assert len(np.unique(seg[row["group_ids"] == g])) == 1
  assert seen == len(docs)
  total = sum(len(d["tokens"]) for d in docs)
  assert sum((r["segment_ids"] > 0).sum() for r in rows) == total


def test_mtp_targets_match_naive_loop():
  rec = _record()
  docs = [S.digits_document("text_to_audio", rec, L),
          S.digits_document("caption_to_image", rec, L)]
  rows = list(S.pack_documents(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=64,
                               num_packing_bins=1))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  for depth in (1, 2):
    tgt, mask = map(np.asarray, S.mtp_targets(batch, depth))
    b, s = batch["tokens"].shape
    for i in range(b):
      for p in range(s):
        ok = batch["loss_mask"][i, p] > 0 and p + depth < s
        for q in range(p, min(p + depth, s - 1)):
          ok = ok and batch["targets"][i, q] == batch["tokens"][i, q + 1] and \
              batch["segment_ids"][i, q] == batch["segment_ids"][i, q + 1] > 0
        ok = ok and batch["loss_mask"][i, p + depth] > 0
        assert mask[i, p] == float(ok), (depth, i, p)
        if ok:
          assert tgt[i, p] == batch["targets"][i, p + depth]
