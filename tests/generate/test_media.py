"""PNG / WAV writing (ernie5_jax/generate/media.py): what is read back is what was written."""

import numpy as np
import pytest
from PIL import Image

from ernie5_jax.generate import media


def test_png_round_trip_with_zoom(tmp_path):
  image = np.random.default_rng(0).uniform(-0.2, 1.2, (4, 5))
  path = str(tmp_path / "sub" / "a.png")
  media.save_png(path, image, zoom=3)
  back = np.asarray(Image.open(path))
  assert back.shape == (12, 15) and back.dtype == np.uint8
  np.testing.assert_array_equal(back[::3, ::3], media.to_uint8(image))
  np.testing.assert_array_equal(back[2::3, 2::3], media.to_uint8(image))
  with pytest.raises(ValueError, match="image.shape"):
    media.save_png(path, np.zeros((2, 2, 2)))


def test_grid_tiles_row_major():
  images = np.arange(5)[:, None, None] * np.ones((5, 2, 2)) / 10
  sheet = media.grid(images, columns=2, pad=1)
  assert sheet.shape == (3 * 3 - 1, 2 * 3 - 1)
  assert sheet[0, 0] == 0.0 and sheet[0, 3] == pytest.approx(0.1)
  assert sheet[6, 0] == pytest.approx(0.4) and sheet[6, 3] == 1.0  # Empty cell: padding.


def test_wav_round_trip(tmp_path):
  wave = 0.5 * np.sin(np.arange(800) / 7.0)
  path = str(tmp_path / "a.wav")
  media.save_wav(path, np.append(wave, 3.0), sample_rate=8000)  # 3.0 is clipped to 1.
  back, rate = media.read_wav(path)
  assert rate == 8000 and back.shape == (801,)
  np.testing.assert_allclose(back[:-1], wave, atol=1 / 32767)
  assert back[-1] == pytest.approx(1.0)
