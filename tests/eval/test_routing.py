"""Routing statistics (ernie5_jax/eval/routing.py) on hand-made examples."""

import json
import math

import numpy as np
import pytest

from ernie5_jax.eval import routing


def test_expert_counts_and_frequency_by_hand():
  # 1 layer, 4 tokens, top-2, 4 experts. Tokens 0, 1 text (0); token 2 image (1); token 3 pad.
  ids = np.array([[[0, 1], [0, 2], [3, 2], [1, 1]]])
  modality = np.array([0, 0, 1, 0])
  valid = np.array([True, True, True, False])
  counts = routing.expert_counts(ids, modality, valid, num_experts=4, num_modalities=3)
  np.testing.assert_array_equal(counts[0], [[2, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
  freq = routing.expert_frequency(counts)
  np.testing.assert_allclose(freq[0, 0], [0.5, 0.25, 0.25, 0.0])
  np.testing.assert_allclose(freq[0, 1], [0.0, 0.0, 0.5, 0.5])
  assert np.isnan(freq[0, 2]).all()  # No tokens of modality 2.


def test_top_experts_ties_take_the_lower_index():
  freq = np.array([0.1, 0.3, 0.3, 0.1, 0.2, 0.0, 0.0, 0.0])  # 8 experts: top 2 = {1, 2}.
  np.testing.assert_array_equal(np.flatnonzero(routing.top_experts(freq)), [1, 2])
  tie = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.flatnonzero(routing.top_experts(tie)), [0, 1])
  # ceil(0.25 * 6) = 2 experts.
  assert routing.top_experts(np.arange(6.0)).sum() == 2
  with pytest.raises(ValueError, match="fraction=0"):
    routing.top_experts(freq, 0.0)


def test_top_expert_iou_by_hand():
  # 8 experts -> top 2. Layer 0: text {0, 1}, image {1, 2} -> IoU 1/3; audio absent.
  # Layer 1: text {4, 5}, image {4, 5} -> IoU 1.
  freq = np.full((2, 3, 8), 0.0)
  freq[0, 0, [0, 1]] = [0.6, 0.4]
  freq[0, 1, [1, 2]] = [0.7, 0.3]
  freq[1, 0, [4, 5]] = [0.5, 0.5]
  freq[1, 1, [4, 5]] = [0.2, 0.8]
  freq[:, 2] = np.nan
  iou = routing.top_expert_iou(freq)
  np.testing.assert_allclose(iou[0, 0, 1], 1 / 3)
  np.testing.assert_allclose(iou[1, 0, 1], 1.0)
  np.testing.assert_allclose(iou[:, 0, 0], 1.0)  # A set with itself.
  np.testing.assert_allclose(iou[:, 1, 0], iou[:, 0, 1])  # Symmetric.
  assert np.isnan(iou[:, 2, :]).all() and np.isnan(iou[:, :, 2]).all()


def test_normalised_entropy_bounds():
  np.testing.assert_allclose(routing.normalised_entropy(np.full(4, 0.25)), 1.0)
  np.testing.assert_allclose(routing.normalised_entropy(np.eye(4)), np.zeros(4))
  p = np.array([0.5, 0.5, 0.0, 0.0])
  np.testing.assert_allclose(routing.normalised_entropy(p), math.log(2) / math.log(4))


def test_mean_by_modality_ignores_padding():
  values = np.array([[1.0, 3.0, 10.0, 100.0]])
  got = routing.mean_by_modality(values, np.array([0, 0, 1, 0]),
                                 np.array([True, True, True, False]), num_modalities=3)
  np.testing.assert_allclose(got[0, :2], [2.0, 10.0])
  assert np.isnan(got[0, 2])


def test_routing_analysis_is_json_ready():
  ids = np.array([[[0, 1], [0, 1], [2, 3], [2, 3]], [[0, 1], [0, 2], [0, 1], [0, 2]]])
  entropy = np.array([[0.5, 0.5, 0.2, 0.2], [0.1, 0.3, 0.9, 0.9]])
  out = routing.routing_analysis(ids, entropy, np.array([0, 0, 1, 1]), np.ones(4, bool),
                                 num_experts=4, modalities=("text", "image", "audio"))
  json.dumps(out, allow_nan=False)  # NaN became None.
  assert out["tokens"] == {"text": 2, "image": 2, "audio": 0}
  assert out["top_size"] == 1
  # Layer 0: text's top expert 0, image's 2 -> IoU 0; layer 1: both 0 -> 1.
  assert out["top_expert_iou"]["text-image"] == {"per_layer": [0.0, 1.0], "mean": 0.5}
  assert "text-audio" not in out["top_expert_iou"]
  assert out["entropy"]["image"]["per_layer"] == pytest.approx([0.2, 0.9])
  assert out["frequency"]["audio"][0] == [None] * 4
  assert out["frequency_all"][0] == pytest.approx([0.25] * 4)
  assert out["load_entropy"]["text"][0] == pytest.approx(math.log(2) / math.log(4))
