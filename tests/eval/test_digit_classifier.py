"""The digit classifier (ernie5_jax/eval/digit_classifier.py) on the tiny embedded digits build."""

import os

import numpy as np
import pytest

from ernie5_jax.eval import digit_classifier as dc

DATASET = "digits_multimodal/tiny"  # 200 train / 50 test digits.
FLOOR = 0.85  # Held-out accuracy floor (measured 0.94 on tiny, 0.98 on the full build).


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_data"))


@pytest.fixture(scope="module")
def clf(data_dir):
  return dc.load_or_train(DATASET, data_dir)


def test_held_out_accuracy_above_floor(clf, data_dir):
  images, labels = dc.real_images("test", dataset=DATASET, data_dir=data_dir)
  accuracy = float(np.mean(dc.classify(images, dataset=DATASET, data_dir=data_dir) == labels))
  assert accuracy >= FLOOR
  assert clf.held_out_accuracy == pytest.approx(accuracy)


def test_float_and_uint8_images_agree(clf, data_dir):
  images, _ = dc.real_images("test", dataset=DATASET, data_dir=data_dir)
  np.testing.assert_array_equal(clf.classify(images), clf.classify(images / 255.0))
  probs = clf.probabilities(images[:5])
  np.testing.assert_allclose(probs.sum(-1), 1.0)
  assert probs.shape == (5, dc.NUM_CLASSES)


def test_cached_under_the_data_dir(clf, data_dir):
  path = dc.cache_path(DATASET, data_dir)
  assert path.startswith(data_dir) and os.path.exists(path)
  again = dc.load_or_train(DATASET, data_dir)  # Read back, not refitted.
  np.testing.assert_array_equal(again.weights, clf.weights)
  assert again.held_out_accuracy == clf.held_out_accuracy


def test_rejects_wrong_shape(clf):
  with pytest.raises(ValueError, match=r"images.shape=\(2, 8, 8\)"):
    clf.classify(np.zeros((2, 8, 8)))
