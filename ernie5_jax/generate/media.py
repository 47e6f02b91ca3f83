"""Writing generated media: images as PNG (Pillow), audio as 16-bit PCM WAV (stdlib wave)."""

from __future__ import annotations

import os
import wave

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Image in [0, 1] (values outside are clipped) -> uint8 0..255."""
  return np.round(np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(path: str, image: np.ndarray, *, zoom: int = 1) -> None:
  """Writes a grayscale image [H, W] in [0, 1] as PNG, each pixel zoom x zoom (nearest)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"image.shape={image.shape} is not accepted: expected [H, W]")
  if zoom < 1:
    raise ValueError(f"zoom={zoom} is not accepted: expected >= 1")
  pixels = np.kron(to_uint8(image), np.ones((zoom, zoom), np.uint8))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(pixels).save(path)  # uint8 [H, W]: mode "L".


def grid(images: np.ndarray, *, columns: int, pad: int = 1) -> np.ndarray:
  """Tiles images [N, H, W] into one [rows * (H + pad) - pad, columns * (W + pad) - pad] sheet."""
  images = np.asarray(images, np.float32)
  n, h, w = images.shape
  rows = -(-n // columns)
  sheet = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad), np.float32)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    sheet[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = image
  return sheet


def save_wav(path: str, wave_data: np.ndarray, *, sample_rate: int) -> None:
  """Writes a mono waveform [L] in [-1, 1] (clipped) as 16-bit PCM WAV."""
  samples = np.asarray(wave_data, np.float64)
  if samples.ndim != 1:
    raise ValueError(f"wave_data.shape={samples.shape} is not accepted: expected [L] (mono)")
  pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(sample_rate)
    f.writeframes(pcm.tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """Reads a 16-bit mono WAV -> (waveform [L] float32 in [-1, 1], sample rate)."""
  with wave.open(path, "rb") as f:
    if f.getsampwidth() != 2 or f.getnchannels() != 1:
      raise ValueError(f"{path}: expected 16-bit mono PCM, got {f.getsampwidth() * 8}-bit "
                       f"{f.getnchannels()} channel(s)")
    data = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    return data.astype(np.float32) / 32767.0, f.getframerate()
