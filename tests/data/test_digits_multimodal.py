"""The embedded digits_multimodal TFDS builder: offline, deterministic, modalities agree."""

import socket

import numpy as np
import pytest

import data as data_lib
from data.digits_multimodal import generate as gen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """digits_multimodal/tiny built with every network connection refused."""
  mp = pytest.MonkeyPatch()
  def refuse(*args, **kwargs):
    raise OSError("network access during an offline build")
  mp.setattr(socket.socket, "connect", refuse)
  try:
    b = data_lib.ensure_built("digits_multimodal/tiny", str(tmp_path_factory.mktemp("digits")))
  finally:
    mp.undo()
  return b


def test_splits_and_features(tiny):
  assert tiny.info.splits["train"].num_examples == 200
  assert tiny.info.splits["test"].num_examples == 50
  rec = tiny.as_data_source("train")[0]
  assert rec["image"].shape == (16, 16) and rec["image"].dtype == np.uint8
  assert rec["video"].shape == (gen.NUM_FRAMES, 16, 16)
  assert rec["audio"].shape == (gen.AUDIO_LEN,) and rec["audio"].dtype == np.int16
  assert isinstance(rec["caption"], bytes)
  assert tiny.data_dir.endswith("1.0.0")
  assert tiny.info.file_format.value == "array_record"


def test_train_and_test_digits_are_disjoint(tiny):
  train = {int(r["digit_index"]) for r in tiny.as_data_source("train")}
  test = {int(r["digit_index"]) for r in tiny.as_data_source("test")}
  assert not train & test


def test_examples_are_deterministic():
  images, labels = gen.load_digits()
  a = gen.make_example(images[5], labels[5], seed=0, copy=0, index=5)
  b = gen.make_example(images[5], labels[5], seed=0, copy=0, index=5)
  c = gen.make_example(images[5], labels[5], seed=1, copy=0, index=5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["audio"], c["audio"])


def _dominant_hz(audio):
  spec = np.abs(np.fft.rfft(audio.astype(np.float64)))
  freqs = np.fft.rfftfreq(len(audio), 1 / gen.SAMPLE_RATE)
  top = freqs[np.argsort(spec)[-40:]]
  row = min(gen._ROW_HZ, key=lambda f: np.min(np.abs(top - f)))
  col = min(gen._COL_HZ, key=lambda f: np.min(np.abs(top - f)))
  return row, col


def test_modalities_describe_the_same_digit(tiny):
  src = tiny.as_data_source("train")
  for i in range(0, 40, 7):
    r = src[i]
    label = int(r["label"])
    word = gen.WORDS[label]
    assert word.encode() in r["caption"] or str(label).encode() in r["caption"]
    assert word.encode() in r["video_caption"]
    row, col = _dominant_hz(r["audio"])
    assert (gen._ROW_HZ.index(row), gen._COL_HZ.index(col)) == gen._KEY[label]
    # The image is the 2x upsampled digit; the video frames hold the native digit.
    images, _ = gen.load_digits()
    digit = images[int(r["digit_index"])]
    np.testing.assert_allclose(r["image"][::2, ::2].astype(float) / 255 * 16,
                               gen.upsample2(digit)[::2, ::2], atol=0.1)
    mass = r["video"].astype(float).sum((1, 2))
    assert np.all(mass > 0.8 * digit.sum() * 255 / 16)


def test_video_moves_in_its_direction(tiny):
  r = tiny.as_data_source("train")[3]
  dy, dx = gen._VELOCITY[int(r["direction"])]
  def centroid(frame):
    ys, xs = np.nonzero(frame > 0)
    w = frame[ys, xs].astype(float)
    return np.array([np.average(ys, weights=w), np.average(xs, weights=w)])
  move = centroid(r["video"][-1]) - centroid(r["video"][0])
  np.testing.assert_allclose(move, [dy * 3, dx * 3], atol=0.6)


def test_unknown_dataset_lists_known(tmp_path):
  with pytest.raises(ValueError, match="digits_multimodal.*stdlib_text"):
    data_lib.builder("mnist", str(tmp_path))
