"""Routing statistics of a trained MoE decoder: expert frequency, top-expert overlap, entropy.

Pure numpy functions over per-token routing records (what the decoder returns with
`return_routing=True`: expert_ids [L, T, K] and token_entropy [L, T] per MoE layer),
so that they are tested on hand-made examples and reused by any analysis.

Definitions (l = MoE layer, m = modality, e = expert, T_m = valid tokens of modality m):
- activation frequency  f[l, m, e] = #{(t, k): t in T_m, ids[l, t, k] = e} / (|T_m| K),
  the share of modality m's routed slots that go to expert e (sums to 1 over e);
- top experts: the ceil(fraction * E) experts of largest f[l, m, :] (ties: lower
  expert index first), fraction = 0.25 in the ERNIE 5.0 report's analysis
  (arXiv 2602.04705, routing-visualisation section: overlap of the top-25% experts
  between modalities);
- IoU[l, a, b] = |top(l, a) & top(l, b)| / |top(l, a) | top(l, b)| (Jaccard index);
- normalised routing entropy: mean over T_m of H(p_t) / log E, H the Shannon
  entropy of token t's routing distribution (the decoder's per-token
  `token_entropy`; 0 = one expert takes all, 1 = uniform);
- load entropy: H(f[l, m, :]) / log E, how evenly modality m's slots spread.
A modality with no valid tokens gets NaN rows (and NaN IoU against it).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TOP_FRACTION = 0.25  # Share of experts compared by top_expert_iou (ERNIE 5.0's analysis).


def expert_counts(expert_ids: np.ndarray, modality: np.ndarray, valid: np.ndarray, *,
                  num_experts: int, num_modalities: int) -> np.ndarray:
  """(token, slot) assignments per layer, modality, expert: [L, T, K] -> [L, M, E] float64.

  Args:
    expert_ids: [layers, tokens, top_k] int expert index of each routed slot.
    modality: [tokens] int modality id of each token (0..num_modalities - 1).
    valid: [tokens] bool, False for padding (not counted).
  """
  expert_ids = np.asarray(expert_ids)
  if expert_ids.ndim != 3:
    raise ValueError(f"expert_ids.shape={expert_ids.shape} is not accepted: expected "
                     "[layers, tokens, top_k]")
  layers, tokens, top_k = expert_ids.shape
  modality, valid = np.asarray(modality).reshape(-1), np.asarray(valid, bool).reshape(-1)
  if modality.shape[0] != tokens or valid.shape[0] != tokens:
    raise ValueError(f"modality.shape={modality.shape}, valid.shape={valid.shape} are not "
                     f"accepted: expected [{tokens}] (the tokens of expert_ids)")
  counts = np.zeros((layers, num_modalities, num_experts), np.float64)
  slot_modality = np.broadcast_to(modality[None, :, None], expert_ids.shape)
  slot_layer = np.broadcast_to(np.arange(layers)[:, None, None], expert_ids.shape)
  keep = np.broadcast_to(valid[None, :, None], expert_ids.shape)
  np.add.at(counts, (slot_layer[keep], slot_modality[keep], expert_ids[keep]), 1.0)
  return counts


def expert_frequency(counts: np.ndarray) -> np.ndarray:
  """Counts [..., E] -> frequencies summing to 1 over experts (NaN where a row is empty)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, counts / np.where(total > 0, total, 1.0), np.nan)


def top_experts(frequency: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
  """Bool mask [..., E] of the ceil(fraction * E) most frequent experts (ties: lower index)."""
  frequency = np.asarray(frequency, np.float64)
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction} is not accepted: expected 0 < fraction <= 1")
  num_experts = frequency.shape[-1]
  n = math.ceil(fraction * num_experts)
  order = np.argsort(-np.nan_to_num(frequency, nan=-np.inf), axis=-1, kind="stable")
  mask = np.zeros(frequency.shape, bool)
  np.put_along_axis(mask, order[..., :n], True, axis=-1)
  return mask


def top_expert_iou(frequency: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
  """IoU of the top-`fraction` expert sets of each pair of modalities: [L, M, E] -> [L, M, M].

  A pair involving a modality whose frequency row is NaN (no tokens) is NaN.
  """
  frequency = np.asarray(frequency, np.float64)
  top = top_experts(frequency, fraction).astype(np.float64)  # [L, M, E]
  inter = np.einsum("lae,lbe->lab", top, top)
  union = top.sum(-1)[:, :, None] + top.sum(-1)[:, None, :] - inter
  iou = inter / np.maximum(union, 1.0)
  absent = np.isnan(frequency).any(-1)  # [L, M]
  return np.where(absent[:, :, None] | absent[:, None, :], np.nan, iou)


def normalised_entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
  """Shannon entropy of distributions along `axis` divided by log(size): values in [0, 1]."""
  probs = np.asarray(probs, np.float64)
  n = probs.shape[axis]
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(probs > 0, -probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
  return terms.sum(axis) / math.log(n) if n > 1 else np.zeros_like(terms.sum(axis))


def mean_by_modality(values: np.ndarray, modality: np.ndarray, valid: np.ndarray, *,
                     num_modalities: int) -> np.ndarray:
  """Per-layer mean of per-token values over each modality's valid tokens: [L, T] -> [L, M].

  NaN for a modality without valid tokens.
  """
  values = np.asarray(values, np.float64)
  modality, valid = np.asarray(modality).reshape(-1), np.asarray(valid, bool).reshape(-1)
  one_hot = (modality[:, None] == np.arange(num_modalities)[None, :]) & valid[:, None]  # [T, M]
  sums = values @ one_hot.astype(np.float64)  # [L, M]
  n = one_hot.sum(0)  # [M]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, sums / np.maximum(n, 1), np.nan)


def routing_analysis(expert_ids: np.ndarray, token_entropy: np.ndarray, modality: np.ndarray,
                     valid: np.ndarray, *, num_experts: int, modalities: Sequence[str],
                     fraction: float = TOP_FRACTION) -> dict:
  """All statistics of the module doc as a JSON-ready dict (NaN -> None).

  Args:
    expert_ids: [layers, tokens, top_k] int routed experts.
    token_entropy: [layers, tokens] normalised entropy of each token's routing distribution.
    modality, valid: [tokens] modality id and not-padding flag.
    num_experts: E.
    modalities: names of modality ids 0..M-1.
    fraction: share of experts in the top sets compared by IoU.
  """
  m = len(modalities)
  counts = expert_counts(expert_ids, modality, valid, num_experts=num_experts,
                         num_modalities=m)  # [L, M, E]
  freq = expert_frequency(counts)
  iou = top_expert_iou(freq, fraction)  # [L, M, M]
  entropy = mean_by_modality(token_entropy, modality, valid, num_modalities=m)  # [L, M]
  load_entropy = np.where(np.isnan(freq).any(-1), np.nan,
                          normalised_entropy(np.nan_to_num(freq)))  # [L, M]
  present = [i for i in range(m) if not np.isnan(freq[:, i]).any()] if len(freq) else []
  pairs = {}
  for i, a in enumerate(present):
    for b in present[i + 1:]:
      per_layer = iou[:, a, b]
      pairs[f"{modalities[a]}-{modalities[b]}"] = {
          "per_layer": _json(per_layer), "mean": _json(np.mean(per_layer))}
  all_freq = expert_frequency(counts.sum(1))  # [L, E], every modality together.
  return {
      "num_layers": int(counts.shape[0]), "num_experts": num_experts,
      "top_fraction": fraction, "top_size": math.ceil(fraction * num_experts),
      "modalities": list(modalities),
      "tokens": {name: int(np.sum(np.asarray(valid, bool).reshape(-1)
                                  & (np.asarray(modality).reshape(-1) == i)))
                 for i, name in enumerate(modalities)},
      "frequency": {name: _json(freq[:, i]) for i, name in enumerate(modalities)},
      "frequency_all": _json(all_freq),
      "top_expert_iou": pairs,
      "entropy": {name: {"per_layer": _json(entropy[:, i]),
                         "mean": _json(np.mean(entropy[:, i]) if len(entropy) else np.nan)}
                  for i, name in enumerate(modalities)},
      "load_entropy": {name: _json(load_entropy[:, i]) for i, name in enumerate(modalities)},
  }


def _json(x):
  """numpy -> nested lists of floats with NaN as None (JSON has no NaN)."""
  arr = np.asarray(x, np.float64)
  if arr.ndim == 0:
    return None if np.isnan(arr) else float(arr)
  return [_json(v) for v in arr]
