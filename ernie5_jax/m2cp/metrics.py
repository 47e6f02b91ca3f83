"""Classification accuracy and retrieval mAP (numpy, on the whole test set).

Retrieval follows the usual 3-D shape-retrieval protocol: cosine similarity of the
embed_dim features; a gallery item is relevant when it has the query's class; AP =
mean over the relevant items of precision at their rank; mAP = mean AP over queries.
Within a modality the query itself is removed from the gallery; across modalities
(query modality a, gallery modality b) the same object's other-modality feature is a
gallery item like any other.
"""

from __future__ import annotations

import itertools

import numpy as np

MODALITIES = ("point", "view", "mesh")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy: logits [N, C], labels [N]."""
  return float(np.mean(np.argmax(logits, -1) == labels))


def average_precisions(sim: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                       *, exclude_self: bool) -> np.ndarray:
  """AP of each query: sim [Q, G] (higher = closer); exclude_self drops item i for query i."""
  sim = np.array(sim, np.float64)
  if exclude_self:
    np.fill_diagonal(sim, -np.inf)
  order = np.argsort(-sim, axis=1, kind="stable")  # [Q, G]
  relevant = gallery_labels[order] == query_labels[:, None]  # [Q, G] in rank order
  if exclude_self:  # The self item sits last (similarity -inf): drop that column.
    keep = order != np.arange(len(sim))[:, None]
    relevant = relevant[keep].reshape(len(sim), -1)
  hits = np.cumsum(relevant, axis=1)
  ranks = np.arange(1, relevant.shape[1] + 1)
  num_rel = relevant.sum(1)
  precision_at_hits = np.where(relevant, hits / ranks, 0.0).sum(1)
  return np.where(num_rel > 0, precision_at_hits / np.maximum(num_rel, 1), 0.0)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return a @ b.T


def retrieval_maps(features: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
  """mAP within each modality ("map/point") and across ordered pairs ("map/point->view")."""
  out = {}
  for m in MODALITIES:
    out[f"map/{m}"] = float(average_precisions(_cosine(features[m], features[m]), labels,
                                               labels, exclude_self=True).mean())
  for a, b in itertools.permutations(MODALITIES, 2):
    out[f"map/{a}->{b}"] = float(average_precisions(_cosine(features[a], features[b]), labels,
                                                    labels, exclude_self=False).mean())
  out["map/mean"] = float(np.mean(list(out.values())))
  return out


def evaluate(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
  """Accuracy per modality and fused, plus retrieval_maps, from the model's test outputs."""
  out = {f"accuracy/{m}": accuracy(outputs[f"logits/{m}"], labels)
         for m in (*MODALITIES, "fused")}
  out.update(retrieval_maps({m: outputs[f"feat/{m}"] for m in MODALITIES}, labels))
  return out
