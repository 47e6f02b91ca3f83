"""Tokenizers: round trips, error falling with scales / levels, versioned assets, text ids."""

import numpy as np
import pytest

from data.digits_multimodal import generate as gen
from ernie5_jax.input_pipeline.tokenizers import audio as audio_lib
from ernie5_jax.input_pipeline.tokenizers import image as image_lib
from ernie5_jax.input_pipeline.tokenizers import text as text_lib

IMAGE_SPEC = image_lib.ImageTokenizerSpec(canvas=16, sub=2, scales=(1, 2, 4, 8), codebook_size=32)
AUDIO_SPEC = audio_lib.AudioTokenizerSpec(levels=3, codebook_size=32)


@pytest.fixture(scope="module")
def arrays():
  """Images [N, 16, 16] and audio [N, L] of 160 digits, made in memory (no TFDS)."""
  images, labels = gen.load_digits()
  ex = [gen.make_example(images[i], labels[i], 0, 0, i) for i in range(160)]
  return {"images": np.stack([e["image"] for e in ex]).astype(np.float32) / 255,
          "audio": np.stack([e["audio"] for e in ex]).astype(np.float32) / 32768}


@pytest.fixture(scope="module")
def image_tok(arrays):
  return image_lib.ImageTokenizer.fit(arrays["images"][:120], IMAGE_SPEC, seed=0)


@pytest.fixture(scope="module")
def audio_tok(arrays):
  return audio_lib.AudioTokenizer.fit(arrays["audio"][:120], AUDIO_SPEC, seed=0)


def test_resize_matrices():
  a = image_lib.area_matrix(16, 4)
  np.testing.assert_allclose(a.sum(1), 1)
  np.testing.assert_allclose(a[0, :4], 0.25)  # Block average.
  u = image_lib.bilinear_matrix(4, 16)
  np.testing.assert_allclose(u.sum(1), 1, rtol=1e-6)
  np.testing.assert_allclose(image_lib.area_matrix(6, 4).sum(1), 1)  # Non-divisible sizes.


def test_image_round_trip_improves_with_scales(image_tok, arrays):
  held_out = arrays["images"][120:]
  codes = image_tok.encode(held_out)
  assert [c.shape for c in codes] == [(40, s, s) for s in IMAGE_SPEC.scales]
  assert all(c.dtype == np.int32 and c.min() >= 0 and c.max() < 32 for c in codes)
  errors = [np.mean((image_tok.decode(codes[:k]) - held_out) ** 2) for k in range(1, 5)]
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert image_lib.psnr(held_out, image_tok.decode(codes)) > 24


def test_image_encode_matches_naive_reference(image_tok, arrays):
  """One scale step against a loop over cells with the textbook definitions."""
  x = arrays["images"][:2]
  codes = image_tok.encode(x)
  s, p, k = 2, 2, 1
  small = np.zeros((2, p * s, p * s))
  for n in range(2):
    r = x[n] - image_tok.decode([c[n:n + 1] for c in codes[:1]])[0]
    for a in range(p * s):
      for b in range(p * s):
        block = 16 // (p * s)
        small[n, a, b] = r[a * block:(a + 1) * block, b * block:(b + 1) * block].mean()
    for i in range(s):
      for j in range(s):
        v = small[n, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
        want = np.argmin(((image_tok.codebooks[k] - v) ** 2).sum(-1))
        assert codes[k][n, i, j] == want


def test_image_save_load_and_version(image_tok, tmp_path):
  image_tok.save(str(tmp_path), {"fit_on": "test"})
  loaded = image_lib.ImageTokenizer.load(str(tmp_path))
  assert loaded.spec == image_tok.spec
  for a, b in zip(loaded.codebooks, image_tok.codebooks):
    np.testing.assert_array_equal(a, b)
  meta = (tmp_path / "image_tokenizer.json").read_text()
  (tmp_path / "image_tokenizer.json").write_text(meta.replace(image_lib.VERSION, "old-v0"))
  with pytest.raises(ValueError, match="version='old-v0'"):
    image_lib.ImageTokenizer.load(str(tmp_path))


def test_image_fit_is_deterministic(arrays):
  spec = image_lib.ImageTokenizerSpec(scales=(1, 2), codebook_size=8)
  a = image_lib.ImageTokenizer.fit(arrays["images"][:50], spec, seed=3)
  b = image_lib.ImageTokenizer.fit(arrays["images"][:50], spec, seed=3)
  for x, y in zip(a.codebooks, b.codebooks):
    np.testing.assert_array_equal(x, y)


def test_image_spec_validation():
  with pytest.raises(ValueError, match="scales"):
    image_lib.ImageTokenizerSpec(canvas=8, sub=2, scales=(1, 2, 4, 8))
  with pytest.raises(ValueError, match="increasing"):
    image_lib.ImageTokenizerSpec(scales=(2, 1))


def test_audio_round_trip_improves_with_levels(audio_tok, arrays, tmp_path):
  held_out = arrays["audio"][120:]
  codes = audio_tok.encode(held_out)
  assert codes.shape == (40, gen.AUDIO_FRAMES, 3) and codes.dtype == np.int32
  snr = [audio_lib.snr_db(held_out, audio_tok.decode(codes[..., :k])) for k in (1, 2, 3)]
  assert all(b > a for a, b in zip(snr, snr[1:])), snr
  assert snr[0] > 2
  audio_tok.save(str(tmp_path))
  again = audio_lib.AudioTokenizer.load(str(tmp_path)).encode(held_out)
  np.testing.assert_array_equal(again, codes)


def test_audio_bad_length():
  tok = audio_lib.AudioTokenizer(AUDIO_SPEC, [np.zeros((32, 160), np.float32)] * 3)
  with pytest.raises(ValueError, match="multiple of frame=160"):
    tok.encode(np.zeros((1, 170)))


def test_text_round_trip():
  tok = text_lib.text_tokenizer()
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 1024)
  for s in ["a handwritten seven", "Q: what digit is shown? A: 7", "Unicode: héllo € 漢字"]:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size and tok.unk_id not in ids
    assert tok.decode(ids) == s
  assert len(tok.encode("a handwritten seven")) <= 5  # Trained pieces, not bytes.


def test_seqio_vocabulary_matches():
  vocab = text_lib.seqio_vocabulary()
  tok = text_lib.text_tokenizer()
  s = "Return the number of items in a sequence."
  assert list(vocab.encode(s)) == list(tok.encode(s))
  assert vocab.vocab_size == tok.vocab_size and vocab.eos_id == 1
