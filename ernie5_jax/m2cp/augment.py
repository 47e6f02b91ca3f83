"""Train-time augmentation of M2CP batches (numpy, in the input pipeline).

Weak (every train row): a random subset of data.num_points points plus Gaussian jitter
of std data.point_jitter (data.py). Strong: FixMatch's second view of an unlabelled
object (Sohn et al., NeurIPS 2020, Sec. 2.3), here one per modality for 3-D data:
- point cloud and mesh: one random rotation about the up (z) axis and one anisotropic
  scale per object, applied to both (mesh normals by the inverse transpose); extra point
  jitter of std data.strong_jitter;
- views: each view shifted by up to data.view_shift pixels, one zeroed square of side
  data.view_cutout (Cutout, DeVries & Taylor 2017), and each view dropped (blanked) with
  probability data.view_drop, keeping at least one.
All three keep the class: the shapes come in random yaw and anisotropic scale already
(data/shapes3d/generate.py: make_mesh).
"""

from __future__ import annotations

import ml_collections
import numpy as np


def random_linear(rng: np.random.Generator, num: int, scale: tuple[float, float]
                  ) -> np.ndarray:
  """num maps x -> diag(s) R_z(theta) x: theta ~ U[0, 2 pi), s ~ U[scale]^3: [num, 3, 3]."""
  theta = rng.uniform(0, 2 * np.pi, num)
  c, s = np.cos(theta), np.sin(theta)
  rot = np.zeros((num, 3, 3))
  rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
  rot[:, 2, 2] = 1.0
  return rng.uniform(*scale, (num, 3))[:, :, None] * rot


def transform_mesh(centers: np.ndarray, normals: np.ndarray, corners: np.ndarray,
                   linear: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies linear [B, 3, 3] to face centres / corner vectors [B, F, 3|9] and normals."""
  b, f, _ = corners.shape
  new_centers = np.einsum("bij,bfj->bfi", linear, centers)
  new_corners = np.einsum("bij,bfkj->bfki", linear, corners.reshape(b, f, 3, 3))
  # Normals map by the inverse transpose: n' ~ A^-T n, renormalised.
  new_normals = np.einsum("bji,bfj->bfi", np.linalg.inv(linear), normals)
  new_normals /= np.maximum(np.linalg.norm(new_normals, axis=-1, keepdims=True), 1e-12)
  return (new_centers.astype(np.float32), new_normals.astype(np.float32),
          new_corners.reshape(b, f, 9).astype(np.float32))


def augment_views(views: np.ndarray, rng: np.random.Generator, *, shift: int, cutout: int,
                  drop: float) -> np.ndarray:
  """Shift, Cutout and view dropout of uint8 views [B, V, H, W] (background 0)."""
  b, v, h, w = views.shape
  padded = np.pad(views, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
  dy, dx = rng.integers(0, 2 * shift + 1, (2, b, v))
  rows = dy[..., None] + np.arange(h)  # [B, V, H]
  cols = dx[..., None] + np.arange(w)  # [B, V, W]
  bi, vi = np.arange(b)[:, None, None, None], np.arange(v)[None, :, None, None]
  out = padded[bi, vi, rows[..., :, None], cols[..., None, :]]  # [B, V, H, W]
  if cutout:
    cy, cx = rng.integers(0, h, (b, v)), rng.integers(0, w, (b, v))
    inside_y = np.abs(np.arange(h) - cy[..., None]) < (cutout + 1) // 2  # [B, V, H]
    inside_x = np.abs(np.arange(w) - cx[..., None]) < (cutout + 1) // 2  # [B, V, W]
    out = np.where(inside_y[..., :, None] & inside_x[..., None, :], 0, out)
  if drop:
    dropped = rng.random((b, v)) < drop
    dropped[np.arange(b), rng.integers(0, v, b)] = False  # Keep at least one view.
    out = np.where(dropped[..., None, None], 0, out)
  return out.astype(views.dtype)


def strong(batch: dict[str, np.ndarray], rng: np.random.Generator,
           cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The strong augmentation of a weakly augmented batch (config.data fields)."""
  out = dict(batch)
  linear = random_linear(rng, len(batch["label"]), tuple(cfg.strong_scale))
  pts = np.einsum("bij,bpj->bpi", linear, batch["points"])
  out["points"] = (pts + rng.normal(0, cfg.strong_jitter, pts.shape)).astype(np.float32)
  out["centers"], out["normals"], out["corners"] = transform_mesh(
      batch["centers"], batch["normals"], batch["corners"], linear)
  out["views"] = augment_views(batch["views"], rng, shift=cfg.view_shift,
                               cutout=cfg.view_cutout, drop=cfg.view_drop)
  return out
