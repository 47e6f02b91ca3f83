"""Pure-numpy generation of the digits_multimodal examples (no TFDS, no network).

One example per (copy, scikit-learn digit), all four modalities about the SAME digit:
- image  uint8 [16, 16]: the 8x8 digit (values 0..16) upsampled 2x bilinearly;
- video  uint8 [4, 16, 16]: the native 8x8 digit translating on a 16x16 canvas,
  2 pixels per frame in one of 8 directions;
- audio  int16 [3200]: 0.4 s at 8 kHz, the digit's telephone-keypad dual tone
  (DTMF, ITU-T Q.23, frequencies rounded to multiples of 50 Hz so a steady tone
  repeats every 20 ms codec frame) with random onset, length, level, phases and noise;
- text: a caption, a question with its answer, a video caption and an audio caption.
Every random choice is drawn from `np.random.default_rng((seed, copy, digit index))`,
so an example does not depend on generation order.
"""

from __future__ import annotations

import numpy as np

CANVAS = 16  # Image / video side, pixels.
NUM_FRAMES = 4
SAMPLE_RATE = 8000  # Hz.
AUDIO_FRAME = 160  # Samples per 20 ms codec frame.
AUDIO_FRAMES = 20
AUDIO_LEN = AUDIO_FRAME * AUDIO_FRAMES  # 0.4 s.
NUM_TEST = 297  # Held-out digits (of 1797); the rest are train.

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("up", "up and right", "right", "down and right", "down", "down and left",
              "left", "up and left")
_VELOCITY = ((-2, 0), (-2, 2), (0, 2), (2, 2), (2, 0), (2, -2), (0, -2), (-2, -2))  # (dy, dx)
# Keypad rows/columns (Q.23: 697/770/852/941 Hz and 1209/1336/1477 Hz), rounded to 50 Hz.
_ROW_HZ = (700, 750, 850, 950)
_COL_HZ = (1200, 1350, 1500)
_KEY = {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2), 7: (2, 0),
        8: (2, 1), 9: (2, 2), 0: (3, 1)}
_CAPTIONS = ("a handwritten {w}", "the digit {d}", "a picture of the number {w}",
             "this is a {w}", "a scanned {w}", "the number {w} written by hand")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's bundled digits: images float [1797, 8, 8] in 0..16, labels [1797]."""
  from sklearn import datasets  # Ships the 8x8 digits inside the package: no download.
  d = datasets.load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str, num: int, seed: int) -> np.ndarray:
  """Indices of the digits in a split: a seeded permutation, the last NUM_TEST are test."""
  perm = np.random.default_rng((seed, 7)).permutation(num)
  if split == "train":
    return np.sort(perm[:-NUM_TEST])
  if split == "test":
    return np.sort(perm[-NUM_TEST:])
  raise ValueError(f"split={split!r} is not accepted: expected 'train' or 'test'")


def upsample2(img: np.ndarray) -> np.ndarray:
  """Bilinear 2x upsampling with half-pixel centres: [h, w] -> [2h, 2w]."""
  h, w = img.shape
  def axis(n):
    x = (np.arange(2 * n) + 0.5) / 2 - 0.5
    x0 = np.clip(np.floor(x).astype(int), 0, n - 1)
    x1 = np.clip(x0 + 1, 0, n - 1)
    frac = np.clip(x - x0, 0.0, 1.0)
    m = np.zeros((2 * n, n), np.float32)
    np.add.at(m, (np.arange(2 * n), x0), 1 - frac)
    np.add.at(m, (np.arange(2 * n), x1), frac)
    return m
  return axis(h) @ img @ axis(w).T


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def make_video(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """Returns (video uint8 [NUM_FRAMES, 16, 16], direction index) of a translating 8x8 digit."""
  direction = int(rng.integers(len(_VELOCITY)))
  dy, dx = _VELOCITY[direction]
  span = CANVAS - 8  # Free room for the top-left corner.
  travel = NUM_FRAMES - 1
  def start(v):
    lo, hi = max(0, -v * travel), min(span, span - v * travel)
    return int(rng.integers(lo, hi + 1))
  y0, x0 = start(dy), start(dx)
  video = np.zeros((NUM_FRAMES, CANVAS, CANVAS), np.float32)
  for f in range(NUM_FRAMES):
    y, x = y0 + dy * f, x0 + dx * f
    video[f, y:y + 8, x:x + 8] = digit * rng.uniform(0.85, 1.0)
  return _to_uint8(video), direction


def make_audio(label: int, rng: np.random.Generator) -> np.ndarray:
  """Returns int16 PCM [AUDIO_LEN]: the digit's keypad tone with jittered timing and level."""
  row, col = _KEY[label]
  onset = int(rng.integers(0, 5)) * AUDIO_FRAME
  length = int(rng.integers(10, 16)) * AUDIO_FRAME
  t = np.arange(length) / SAMPLE_RATE
  phase = rng.uniform(0, 2 * np.pi, 2)
  tone = (np.sin(2 * np.pi * _ROW_HZ[row] * t + phase[0])
          + rng.uniform(0.7, 1.0) * np.sin(2 * np.pi * _COL_HZ[col] * t + phase[1]))
  wave = rng.normal(0.0, rng.uniform(0.01, 0.05), AUDIO_LEN)
  wave[onset:onset + length] += rng.uniform(0.2, 0.45) * tone
  return np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)


def make_texts(label: int, direction: int, rng: np.random.Generator) -> dict[str, str]:
  """Returns caption / question / answer / video_caption / audio_caption about one digit."""
  w, d = WORDS[label], str(label)
  qa = (("what digit is shown?", d), ("which number is this?", w),
        ("is the digit even or odd?", "even" if label % 2 == 0 else "odd"),
        ("what number comes next?", str(label + 1)), ("what number comes before?",
                                                       str(label - 1)))
  question, answer = qa[int(rng.integers(len(qa)))]
  return {
      "caption": _CAPTIONS[int(rng.integers(len(_CAPTIONS)))].format(w=w, d=d),
      "question": question,
      "answer": answer,
      "video_caption": f"a {w} moving {DIRECTIONS[direction]}",
      "audio_caption": ("the keypad tone for " + w) if rng.random() < 0.5 else
                       f"the sound of key {d}",
  }


def make_example(digit: np.ndarray, label: int, seed: int, copy: int, index: int) -> dict:
  """Returns one example's features (numpy / str) for a digit image [8, 8] in 0..16."""
  rng = np.random.default_rng((seed, copy, index))
  video, direction = make_video(digit, rng)
  out = {
      "label": int(label),
      "image": _to_uint8(upsample2(digit)),
      "video": video,
      "direction": direction,
      "audio": make_audio(int(label), rng),
      "digit_index": int(index),
  }
  out.update(make_texts(int(label), direction, rng))
  return out
