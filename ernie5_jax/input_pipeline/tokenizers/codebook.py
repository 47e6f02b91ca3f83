"""k-means codebooks and nearest-code assignment shared by the image and audio quantizers."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def fit_codebook(vectors: np.ndarray, size: int, *, seed: int, max_points: int = 10_000,
                 max_iter: int = 30) -> np.ndarray:
  """k-means (Lloyd, k-means++ init; sklearn) codebook [size, dim] of vectors [n, dim]."""
  from sklearn.cluster import KMeans
  if vectors.ndim != 2 or len(vectors) == 0:
    raise ValueError(f"vectors.shape={vectors.shape} is not accepted: expected [n > 0, dim]")
  rng = np.random.default_rng(seed)
  if len(vectors) > max_points:  # A seeded subsample keeps fitting to seconds.
    vectors = vectors[np.sort(rng.choice(len(vectors), max_points, replace=False))]
  vectors = vectors.astype(np.float64)
  # Fewer distinct points than codes (e.g. all-zero residuals): pad with repeats.
  k = min(size, len(np.unique(vectors, axis=0)))
  km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(vectors)
  codebook = km.cluster_centers_
  if k < size:
    codebook = np.concatenate([codebook, np.repeat(codebook[:1], size - k, axis=0)])
  return codebook.astype(np.float32)


def assign(vectors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """Index of the nearest code (squared L2) for vectors [..., dim] -> [...] int32."""
  flat = vectors.reshape(-1, vectors.shape[-1])  # [n, dim]
  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
  dist = (codebook * codebook).sum(-1)[None, :] - 2.0 * flat @ codebook.T  # [n, size]
  return dist.argmin(-1).astype(np.int32).reshape(vectors.shape[:-1])


def save_codebooks(directory: str, name: str, codebooks: dict[str, np.ndarray],
                   meta: dict[str, Any]) -> None:
  """Writes <name>.npz (the codebooks) and <name>.json (meta: version, spec, ...)."""
  os.makedirs(directory, exist_ok=True)
  np.savez(os.path.join(directory, f"{name}.npz"), **codebooks)
  with open(os.path.join(directory, f"{name}.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def load_codebooks(directory: str, name: str, *, version: str, what: str
                   ) -> tuple[dict[str, Any], Any]:
  """Reads what save_codebooks wrote -> (meta, npz arrays); raises if meta's version differs."""
  with open(os.path.join(directory, f"{name}.json")) as f:
    meta = json.load(f)
  if meta.get("version") != version:
    raise ValueError(f"{what} version={meta.get('version')!r} in {directory} is not "
                     f"accepted: expected {version!r} (refit with fit_tokenizers)")
  return meta, np.load(os.path.join(directory, f"{name}.npz"))
