"""The labelled split, the train batches, the shapes3d generator and the M2CP config checks."""

import os
import runpy

import numpy as np
import pytest

from data.shapes3d import generate, geometry
from ernie5_jax.m2cp import config as config_lib
from ernie5_jax.m2cp import data as data_lib


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1])
def test_labelled_split_class_balanced_seeded_fraction(fraction):
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(12), 100))
  split = data_lib.labelled_split(labels, fraction, seed=3)
  counts = np.bincount(labels[split], minlength=12)
  assert (counts == round(fraction * 100)).all()
  assert len(split) == round(fraction * 1200) and len(np.unique(split)) == len(split)
  np.testing.assert_array_equal(split, data_lib.labelled_split(labels, fraction, seed=3))
  assert not np.array_equal(split, data_lib.labelled_split(labels, fraction, seed=4))


def test_labelled_split_keeps_one_per_class_and_rejects_bad_fraction():
  labels = np.repeat(np.arange(3), 10)
  assert np.bincount(labels[data_lib.labelled_split(labels, 0.01, 0)]).tolist() == [1, 1, 1]
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="fraction"):
      data_lib.labelled_split(labels, bad, 0)


@pytest.mark.parametrize("bad", [0.0, 1.01, -0.5])
def test_config_rejects_label_fraction_outside_unit_interval(bad):
  cfg = config_lib.default_config()
  cfg.data.label_fraction = bad
  with pytest.raises(config_lib.ConfigError, match=r"data.label_fraction.*\(0, 1\]"):
    config_lib.validate(cfg)
  cfg.data.label_fraction = 1.0
  config_lib.validate(cfg)


def test_supervised_baseline_reads_no_unlabelled_rows():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  get = lambda name: runpy.run_path(os.path.join(root, "experiments", name))["get_config"]
  m2cp, supervised = get("m2cp_shapes.py")("frac=0.05"), get("m2cp_shapes_supervised.py")("")
  assert config_lib.uses_unlabelled(m2cp) and not config_lib.uses_unlabelled(supervised)
  unlabelled_losses = ("consistency_weight", "m2cp_weight", "pseudo_ce_weight",
                       "class_balance_weight")
  for name in unlabelled_losses:  # Each unlabelled loss alone needs the unlabelled rows.
    solo = config_lib.default_config()
    solo.loss.update({other: float(other == name) for other in unlabelled_losses})
    assert config_lib.uses_unlabelled(solo), name
  assert m2cp.data.label_fraction == 0.05 and m2cp.loss.class_balance_weight > 0


def test_train_batch_deterministic_labelled_first():
  rng = np.random.default_rng(0)
  n = 20
  arrays = {"points": rng.normal(size=(n, 1024, 3)).astype(np.float32),
            "views": np.zeros((n, 12, 4, 4), np.uint8),
            "centers": np.zeros((n, 6, 3), np.float32), "normals": np.zeros((n, 6, 3), np.float32),
            "corners": np.zeros((n, 6, 9), np.float32), "neighbors": np.zeros((n, 6, 3), np.int32),
            "label": np.arange(n) % 4}
  cfg = config_lib.default_config()
  cfg.data.labelled_batch_size, cfg.data.unlabelled_batch_size, cfg.data.num_points = 3, 5, 64
  cfg.data.strong_unlabelled = False  # test_augment.py covers the strong rows.
  fn = data_lib.TrainBatch(arrays, np.array([0, 5]), cfg.data, seed=1, with_unlabelled=True)
  a, b = fn(7), fn(7)
  assert a["points"].shape == (8, 64, 3) and a["label"].shape == (8,)
  np.testing.assert_array_equal(a["points"], b["points"])
  assert set(a["label"][:3]) <= {0, 1}  # Labelled rows: objects 0 and 5 only.
  sup = data_lib.TrainBatch(arrays, np.array([0, 5]), cfg.data, 1, with_unlabelled=False)(7)
  assert sup["label"].shape == (3,)


def test_shapes3d_examples_deterministic_and_valid():
  a = generate.make_example(7, 0, "train", 3)
  b = generate.make_example(7, 0, "train", 3)
  for k in ("points", "views", "centers", "neighbors"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["points"].shape == (generate.NUM_POINTS, 3)
  assert a["views"].shape == (generate.NUM_VIEWS, generate.VIEW_SIZE, generate.VIEW_SIZE)
  assert a["centers"].shape == (generate.NUM_FACES, 3)
  geometry.check_example("x", a["points"], a["neighbors"], min_points=1024)
  assert (a["views"] > 0).mean() > 0.05  # The object is visible.
  assert np.abs(a["points"]).max() <= 1.1


def test_face_neighbors_of_a_tetrahedron():
  faces = np.array([[0, 1, 2], [0, 3, 1], [1, 3, 2], [0, 2, 3]])
  nbr = geometry.face_neighbors(faces)
  for f in range(4):
    assert sorted(nbr[f]) == sorted(set(range(4)) - {f})


def test_check_example_names_the_sample():
  pts = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="'obj_1'.*N >= 16"):
    geometry.check_example("obj_1", pts, np.zeros((4, 3), int), min_points=16)
  pts[2, 1] = np.nan
  with pytest.raises(ValueError, match="'obj_2'.*non-finite"):
    geometry.check_example("obj_2", pts, np.zeros((4, 3), int), min_points=4)
  with pytest.raises(ValueError, match="'obj_3'.*index 9 is out of range"):
    geometry.check_example("obj_3", np.zeros((10, 3)), np.array([[0, 1, 9]] * 4),
                           min_points=4)
