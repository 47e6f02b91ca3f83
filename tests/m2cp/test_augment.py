"""The strong augmentation: label-preserving geometry, view ops, and the batch layout."""

import numpy as np
import pytest

from ernie5_jax.m2cp import augment
from ernie5_jax.m2cp import config as config_lib
from ernie5_jax.m2cp import data as data_lib


def test_random_linear_is_yaw_rotation_then_axis_scale():
  rng = np.random.default_rng(0)
  a = augment.random_linear(rng, 5, (0.8, 1.25))
  np.testing.assert_allclose(a[:, 2, :2], 0)
  np.testing.assert_allclose(a[:, :2, 2], 0)
  scales = np.linalg.norm(a, axis=2)  # Row norms of diag(s) R = s.
  assert ((scales >= 0.8) & (scales <= 1.25)).all()


def test_transform_mesh_normals_stay_normal_to_the_mapped_face():
  rng = np.random.default_rng(1)
  tri = rng.normal(size=(2, 4, 3, 3))  # [B, F, corner, xyz]
  centers = tri.mean(2)
  normals = np.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  corners = (tri - centers[:, :, None]).reshape(2, 4, 9)
  a = augment.random_linear(rng, 2, (0.5, 2.0))
  c2, n2, k2 = augment.transform_mesh(centers, normals, corners, a)
  mapped = np.einsum("bij,bfkj->bfki", a, tri)  # Naive: map each corner.
  np.testing.assert_allclose(c2, mapped.mean(2), atol=1e-5)
  np.testing.assert_allclose(k2, (mapped - mapped.mean(2, keepdims=True)).reshape(2, 4, 9),
                             atol=1e-5)
  want = np.cross(mapped[:, :, 1] - mapped[:, :, 0], mapped[:, :, 2] - mapped[:, :, 0])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(n2, want, atol=1e-5)


def test_augment_views_identity_shift_cutout_and_drop():
  rng = np.random.default_rng(2)
  views = rng.integers(1, 256, (3, 12, 8, 8)).astype(np.uint8)
  same = augment.augment_views(views, rng, shift=0, cutout=0, drop=0.0)
  np.testing.assert_array_equal(same, views)
  shifted = augment.augment_views(views, rng, shift=2, cutout=0, drop=0.0)
  for b in range(3):  # Each view is a translate of the original: some 4x4 window matches.
    for v in range(12):
      assert any(np.array_equal(shifted[b, v, 2 + dy:6 + dy, 2 + dx:6 + dx], views[b, v, 2:6, 2:6])
                 for dy in range(-2, 3) for dx in range(-2, 3))
  cut = augment.augment_views(views, rng, shift=0, cutout=3, drop=0.0)
  zeros = (cut == 0).sum((2, 3))
  assert ((zeros >= 4) & (zeros <= 9)).all()  # A 3x3 square, clipped at the border.
  dropped = augment.augment_views(views, rng, shift=0, cutout=0, drop=0.99)
  blank = (dropped == 0).all((2, 3))  # [B, V]
  assert (~blank).sum(1).min() >= 1 and blank.sum() > 20


def test_train_batch_strong_rows_follow_the_unlabelled_rows():
  rng = np.random.default_rng(0)
  n = 20
  arrays = {"points": rng.normal(size=(n, 1024, 3)).astype(np.float32),
            "views": rng.integers(0, 256, (n, 12, 8, 8)).astype(np.uint8),
            "centers": rng.normal(size=(n, 6, 3)).astype(np.float32),
            "normals": rng.normal(size=(n, 6, 3)).astype(np.float32),
            "corners": rng.normal(size=(n, 6, 9)).astype(np.float32),
            "neighbors": np.zeros((n, 6, 3), np.int32), "label": np.arange(n) % 4}
  cfg = config_lib.default_config().data
  cfg.labelled_batch_size, cfg.unlabelled_batch_size, cfg.num_points = 3, 5, 64
  cfg.strong_unlabelled = True
  batch = data_lib.TrainBatch(arrays, np.array([0, 5]), cfg, seed=1, with_unlabelled=True)(7)
  assert batch["points"].shape == (13, 64, 3) and batch["views"].shape == (13, 12, 8, 8)
  np.testing.assert_array_equal(batch["label"][3:8], batch["label"][8:])
  assert not np.allclose(batch["points"][3:8], batch["points"][8:])
  # Same objects: the strong points are a yaw-rotated, scaled copy (norms within the range).
  ratio = np.linalg.norm(batch["points"][8:], axis=-1) / np.linalg.norm(
      batch["points"][3:8], axis=-1)
  assert np.median(ratio) > 0.7 and np.median(ratio) < 1.35


@pytest.mark.parametrize("path, value, accepted", [
    ("data.strong_scale", (1.25, 0.8), "0 < low <= high"),
    ("data.view_drop", 1.0, r"\[0, 1\)"),
    ("loss.pseudo_label_source", "teacher", r"\('fused', 'ensemble'\)"),
    ("loss.alignment_momentum", 1.0, r"\[0, 1\)"),
    ("data.view_cutout", -1, ">= 0"),
])
def test_config_rejects_bad_augmentation_and_pseudo_label_fields(path, value, accepted):
  cfg = config_lib.default_config()
  section, name = path.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{path}=.*{accepted}"):
    config_lib.validate(cfg)
