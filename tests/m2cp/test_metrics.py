"""Retrieval mAP on a hand-made ranking and against scikit-learn; accuracy."""

import numpy as np
from sklearn.metrics import average_precision_score

from ernie5_jax.m2cp import metrics


def test_ap_hand_made_ranking():
  # One query of class 0; gallery ranked by similarity: rel, not, rel, not, rel.
  sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
  gallery = np.array([0, 1, 0, 1, 0])
  ap = metrics.average_precisions(sim, np.array([0]), gallery, exclude_self=False)
  np.testing.assert_allclose(ap, [(1 / 1 + 2 / 3 + 3 / 5) / 3])


def test_ap_exclude_self():
  sim = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]])
  labels = np.array([0, 1, 0])
  ap = metrics.average_precisions(sim, labels, labels, exclude_self=True)
  np.testing.assert_allclose(ap, [1.0, 0.0, 1.0])  # Item 1 has no other of its class.


def test_ap_matches_sklearn():
  rng = np.random.default_rng(0)
  q, g = 7, 30
  sim = rng.normal(size=(q, g))
  ql, gl = rng.integers(0, 3, q), rng.integers(0, 3, g)
  got = metrics.average_precisions(sim, ql, gl, exclude_self=False)
  want = [average_precision_score(gl == ql[i], sim[i]) for i in range(q)]
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_retrieval_maps_and_evaluate():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 4)
  centers = rng.normal(size=(3, 8)) * 5
  feats = {m: centers[labels] + rng.normal(size=(12, 8)) * 0.1 for m in metrics.MODALITIES}
  maps = metrics.retrieval_maps(feats, labels)
  assert len(maps) == 3 + 6 + 1
  assert maps["map/mean"] > 0.99  # Well-separated clusters rank perfectly.
  onehot = np.eye(3)[labels]
  outputs = {f"logits/{m}": onehot for m in (*metrics.MODALITIES, "fused")}
  outputs.update({f"feat/{m}": f for m, f in feats.items()})
  result = metrics.evaluate(outputs, labels)
  assert result["accuracy/fused"] == 1.0 and result["accuracy/view"] == 1.0
