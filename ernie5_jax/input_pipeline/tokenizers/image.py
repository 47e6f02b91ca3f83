"""Multi-scale residual quantizer for images and video frames (VAR, Tian et al. 2024).

After VAR (arXiv 2404.02905, Sec. 3.2 / Algorithm 1), with the identity as the
"encoder": the residual r starts as the image x [H, W] in [0, 1]; for each scale
s in `scales` (e.g. 1, 2, 4, 8):
  1. area-downsample r to a (p*s) x (p*s) map (p = `sub`, a cell's sub-grid);
  2. cut it into s x s cells of p*p values and quantise each cell vector against
     scale s's k-means codebook -> code map [s, s];
  3. look the codes up, upsample bilinearly to H x W and subtract from r.
Decoding sums the upsampled look-ups of the given scales, so any prefix of the
scales decodes to a coarser image and the error falls as scales are added.
Each scale has its own codebook (residual statistics differ by scale).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ernie5_jax.input_pipeline.tokenizers import codebook as cb

VERSION = "msrq-image-v1"


@dataclasses.dataclass(frozen=True)
class ImageTokenizerSpec:
  """canvas: image side H = W; sub: cell sub-grid p; scales: code-map sides; codebook_size."""
  canvas: int = 16
  sub: int = 2
  scales: tuple[int, ...] = (1, 2, 4, 8)
  codebook_size: int = 64

  def __post_init__(self):
    if not self.scales or list(self.scales) != sorted(set(self.scales)):
      raise ValueError(f"scales={self.scales} is not accepted: expected increasing sides")
    if self.sub * self.scales[-1] > self.canvas:
      raise ValueError(f"scales={self.scales} with sub={self.sub} is not accepted: "
                       f"sub * max(scales) must be <= canvas={self.canvas}")

  @property
  def tokens_per_image(self) -> int:
    """Codes over all scales."""
    return sum(s * s for s in self.scales)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] adaptive average pooling (area resize) along one axis."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = i * n_in / n_out, (i + 1) * n_in / n_out
    for j in range(int(np.floor(lo)), int(np.ceil(hi))):
      m[i, j] = min(hi, j + 1) - max(lo, j)  # Overlap of output cell i with input pixel j.
  return m / m.sum(1, keepdims=True)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear resize along one axis, half-pixel centres, edges clamped."""
  x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  x0 = np.floor(x).astype(int)
  x1 = np.minimum(x0 + 1, n_in - 1)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), x0), 1 - (x - x0))
  np.add.at(m, (np.arange(n_out), x1), x - x0)
  return m


class ImageTokenizer:
  """Encode images [N, H, W] to per-scale code maps [N, s, s]; decode back."""

  def __init__(self, spec: ImageTokenizerSpec, codebooks: list[np.ndarray]):
    if len(codebooks) != len(spec.scales):
      raise ValueError(f"len(codebooks)={len(codebooks)} is not accepted: expected one per "
                       f"scale {spec.scales}")
    self.spec = spec
    self.codebooks = [np.asarray(c, np.float32) for c in codebooks]  # each [C, sub*sub]
    p, hw = spec.sub, spec.canvas
    self._down = [area_matrix(hw, p * s) for s in spec.scales]  # each [p*s, H]
    self._up = [bilinear_matrix(p * s, hw) for s in spec.scales]  # each [H, p*s]

  # --- cell layout: [N, p*s, p*s] map <-> [N, s, s, p*p] vectors -----------------------
  def _to_cells(self, m: np.ndarray, s: int) -> np.ndarray:
    p = self.spec.sub
    n = m.shape[0]
    return m.reshape(n, s, p, s, p).transpose(0, 1, 3, 2, 4).reshape(n, s, s, p * p)

  def _from_cells(self, v: np.ndarray, s: int) -> np.ndarray:
    p = self.spec.sub
    n = v.shape[0]
    return v.reshape(n, s, s, p, p).transpose(0, 1, 3, 2, 4).reshape(n, p * s, p * s)

  def _scale_step(self, k: int, residual: np.ndarray, codebook=None):
    """Quantises scale k of residual [N, H, W]; returns (codes [N, s, s], upsampled [N, H, W])."""
    s = self.spec.scales[k]
    small = self._down[k] @ residual @ self._down[k].T  # 'ah,nhw,bw->nab': [N, ps, ps]
    cells = self._to_cells(small, s)  # [N, s, s, p*p]
    codebook = self.codebooks[k] if codebook is None else codebook
    codes = cb.assign(cells, codebook)  # [N, s, s]
    return codes, self._lookup_up(k, codes, codebook)

  def _lookup_up(self, k: int, codes: np.ndarray, codebook=None) -> np.ndarray:
    codebook = self.codebooks[k] if codebook is None else codebook
    q = self._from_cells(codebook[codes], self.spec.scales[k])  # [N, ps, ps]
    return self._up[k] @ q @ self._up[k].T  # 'ha,nab,wb->nhw': [N, H, W]

  def encode(self, images: np.ndarray) -> list[np.ndarray]:
    """images [N, H, W] float in [0, 1] -> list over scales of codes [N, s, s] int32."""
    images = np.asarray(images, np.float32)
    if images.ndim != 3 or images.shape[1:] != (self.spec.canvas,) * 2:
      raise ValueError(f"images.shape={images.shape} is not accepted: expected "
                       f"[N, {self.spec.canvas}, {self.spec.canvas}]")
    residual = images.copy()
    out = []
    for k in range(len(self.spec.scales)):
      codes, up = self._scale_step(k, residual)
      residual -= up
      out.append(codes)
    return out

  def decode(self, codes: list[np.ndarray]) -> np.ndarray:
    """Codes of the first len(codes) scales, each [N, s, s] -> images [N, H, W]."""
    if not 1 <= len(codes) <= len(self.spec.scales):
      raise ValueError(f"len(codes)={len(codes)} is not accepted: expected 1.."
                       f"{len(self.spec.scales)} scales")
    return sum(self._lookup_up(k, np.asarray(c)) for k, c in enumerate(codes))

  @classmethod
  def fit(cls, images: np.ndarray, spec: ImageTokenizerSpec, *, seed: int) -> "ImageTokenizer":
    """Fits the per-scale codebooks greedily, coarse to fine, on images [N, H, W] in [0, 1]."""
    tok = cls(spec, [np.zeros((spec.codebook_size, spec.sub ** 2), np.float32)] * len(spec.scales))
    residual = np.asarray(images, np.float32).copy()
    for k, s in enumerate(spec.scales):
      small = tok._down[k] @ residual @ tok._down[k].T  # [N, ps, ps]
      cells = tok._to_cells(small, s).reshape(-1, spec.sub ** 2)
      tok.codebooks[k] = cb.fit_codebook(cells, spec.codebook_size, seed=seed + k)
      _, up = tok._scale_step(k, residual)
      residual -= up
    return tok

  def save(self, directory: str, extra: dict | None = None) -> None:
    """Writes image_tokenizer.npz (codebooks) and image_tokenizer.json (version, spec)."""
    meta = {"version": VERSION, "spec": dataclasses.asdict(self.spec), **(extra or {})}
    codebooks = {f"scale_{s}": c for s, c in zip(self.spec.scales, self.codebooks)}
    cb.save_codebooks(directory, "image_tokenizer", codebooks, meta)

  @classmethod
  def load(cls, directory: str) -> "ImageTokenizer":
    """Reads a tokenizer written by `save`; raises if its version is not VERSION."""
    meta, arrays = cb.load_codebooks(directory, "image_tokenizer", version=VERSION,
                                     what="image tokenizer")
    spec = ImageTokenizerSpec(**{**meta["spec"], "scales": tuple(meta["spec"]["scales"])})
    return cls(spec, [arrays[f"scale_{s}"] for s in spec.scales])


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """Peak signal-to-noise ratio in dB of images in [0, 1]."""
  mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
  return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
