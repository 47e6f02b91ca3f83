"""Residual-VQ audio codec on 20 ms waveform frames (SoundStream-style RVQ).

After SoundStream (Zeghidour et al. 2021, arXiv 2107.03312, Sec. 3.3, Algorithm 1)
with the identity as encoder: the waveform is cut into frames of `frame`
samples; level 1 quantises each frame against a k-means codebook, level l
quantises the residual left by levels 1..l-1. encode -> codes [N, T, K];
decode(codes[..., :k]) sums the first k levels' look-ups, so error falls with k.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ernie5_jax.input_pipeline.tokenizers import codebook as cb

VERSION = "rvq-audio-v1"


@dataclasses.dataclass(frozen=True)
class AudioTokenizerSpec:
  """sample_rate (Hz); frame: samples per codec frame; levels K; codebook_size per level."""
  sample_rate: int = 8000
  frame: int = 160
  levels: int = 4
  codebook_size: int = 128


class AudioTokenizer:
  """Encode waveforms [N, L] in [-1, 1] to codes [N, L // frame, K]; decode back."""

  def __init__(self, spec: AudioTokenizerSpec, codebooks: list[np.ndarray]):
    if len(codebooks) != spec.levels:
      raise ValueError(f"len(codebooks)={len(codebooks)} is not accepted: expected "
                       f"levels={spec.levels}")
    self.spec = spec
    self.codebooks = [np.asarray(c, np.float32) for c in codebooks]  # each [C, frame]

  def _frames(self, waves: np.ndarray) -> np.ndarray:
    waves = np.asarray(waves, np.float32)
    if waves.ndim != 2 or waves.shape[1] % self.spec.frame:
      raise ValueError(f"waves.shape={waves.shape} is not accepted: expected [N, L] with L a "
                       f"multiple of frame={self.spec.frame}")
    return waves.reshape(waves.shape[0], -1, self.spec.frame)  # [N, T, frame]

  def encode(self, waves: np.ndarray) -> np.ndarray:
    """waves [N, L] -> codes [N, T, K] int32."""
    residual = self._frames(waves).copy()
    codes = []
    for book in self.codebooks:
      c = cb.assign(residual, book)  # [N, T]
      residual -= book[c]
      codes.append(c)
    return np.stack(codes, -1)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """codes [N, T, k] (k <= K: the first k levels) -> waves [N, T * frame]."""
    codes = np.asarray(codes)
    if not 1 <= codes.shape[-1] <= self.spec.levels:
      raise ValueError(f"codes.shape={codes.shape} is not accepted: expected 1..{self.spec.levels}"
                       " levels on the last axis")
    frames = sum(self.codebooks[l][codes[..., l]] for l in range(codes.shape[-1]))  # [N, T, F]
    return frames.reshape(codes.shape[0], -1)

  @classmethod
  def fit(cls, waves: np.ndarray, spec: AudioTokenizerSpec, *, seed: int) -> "AudioTokenizer":
    """Fits the K level codebooks greedily on waveforms [N, L] in [-1, 1]."""
    tok = cls(spec, [np.zeros((spec.codebook_size, spec.frame), np.float32)] * spec.levels)
    residual = tok._frames(waves).reshape(-1, spec.frame).copy()  # [N * T, frame]
    for l in range(spec.levels):
      tok.codebooks[l] = cb.fit_codebook(residual, spec.codebook_size, seed=seed + l,
                                         max_points=4_000, max_iter=20)
      residual -= tok.codebooks[l][cb.assign(residual, tok.codebooks[l])]
    return tok

  def save(self, directory: str, extra: dict | None = None) -> None:
    """Writes audio_tokenizer.npz (codebooks) and audio_tokenizer.json (version, spec)."""
    meta = {"version": VERSION, "spec": dataclasses.asdict(self.spec), **(extra or {})}
    codebooks = {f"level_{l}": c for l, c in enumerate(self.codebooks)}
    cb.save_codebooks(directory, "audio_tokenizer", codebooks, meta)

  @classmethod
  def load(cls, directory: str) -> "AudioTokenizer":
    """Reads a codec written by `save`; raises if its version is not VERSION."""
    meta, arrays = cb.load_codebooks(directory, "audio_tokenizer", version=VERSION,
                                     what="audio tokenizer")
    spec = AudioTokenizerSpec(**meta["spec"])
    return cls(spec, [arrays[f"level_{l}"] for l in range(spec.levels)])


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
  """Signal-to-noise ratio in dB of reconstruction y against x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(10.0 * np.log10(np.sum(x ** 2) / max(np.sum((x - y) ** 2), 1e-20)))
