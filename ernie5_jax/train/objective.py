"""The next-group-of-tokens objective (DESIGN.md): per-modality losses, their weighting, metrics.

Per position p of the batch (M = modality, mask = loss_mask):
- main loss: CE(logits_p, targets_p). This one head covers text (next token), vision
  (next-frame-and-scale: a scale's group predicts its codes in parallel from earlier
  scales, group_ids make the group bidirectional; input_pipeline/sequence.py) and audio
  level 1 (next codec frame). CE_m = sum_p mask_p [M_p = m] ce_p / n_m, where
  n_m = sum_p mask_p [M_p = m].
- text multi-token prediction (DeepSeek-V3, arXiv 2412.19437, Sec. 2.2, eq. 24-25): depth
  d predicts targets[p + d] from MTP module d; valid where p..p+d is one next-token chain
  of one segment (sequence.mtp_targets) and both p and p + d are text.
  L_text = CE_text + mtp_weight * (1/D) sum_d CE_mtp_d.
- audio heads (next-codec prediction): level k = 2..K of the target frame,
  teacher-forced on its levels < k (model/heads.py), where audio_targets[p, k-1] >= 0.
  L_audio = CE_audio + sum_k audio_level_weights[k-2] * CE_audio_k.
- L_image = CE_image, L_video = CE_video.

Combination, with the batch's token shares pi_m = n_m / sum_m' n_m':
  "uniform":   total = sum_m pi_m L_m       (= the token-mean CE when MTP/audio heads are off)
  "posterior": total = sum_m pi_m w_m L_m,  w_m = stop_gradient(e_bar / e_m),
               e_bar = sum_m pi_m e_m,
               e_m <- L_m if e_m = 0 (first sight) else beta e_m + (1 - beta) L_m,
               updated (before use) only for the modalities present in the batch.
ERNIE 5.0 (arXiv 2602.04705) combines its modalities' losses with posterior-based
weighting, rescaling each modality's loss to a common interval; the exact estimator is
not published, so this uses the running mean e_m of each modality's own loss as its
posterior scale: every present modality contributes ~e_bar (the token-weighted mean loss
level), so a modality whose loss is intrinsically larger does not dominate the gradient,
and with one modality it reduces to plain training. e_m lives in the model's LossEMA
(non-trainable, checkpointed); the train step writes back aux["loss_ema"].
Router terms are added as before: + load_balance_weight * lb + z_loss_weight * z.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ernie5_jax.input_pipeline import MODALITIES
from ernie5_jax.input_pipeline import sequence as seq_lib

Batch = dict[str, jax.Array]
TEXT = int(seq_lib.Modality.TEXT)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(values * mask) / max(sum(mask), 1); values, mask of one shape."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@jax.custom_vjp
def _ce_and_hit(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(CE [...], hit [...]) of float32 logits [..., V]: one max and one exp-sum over V."""
  return _ce_fwd(logits, labels)[0]


def _ce_fwd(logits, labels):
  top = jnp.max(logits, axis=-1)  # [...]
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  # A hit is a label logit equal to the maximum (an argmax over V would be a second pass).
  hit = (label_logit >= top).astype(jnp.float32)
  return (lse - label_logit, hit), (logits, labels, lse)


def _ce_bwd(saved, cotangents):
  logits, labels, lse = saved
  d_ce, _ = cotangents  # the hit has no gradient
  # d CE / d logits = softmax - one_hot(label): one pass over [..., V], then the -1 at each
  # label as a scatter of one value per position (a one-hot would be a second [..., V] array).
  d_logits = jnp.exp(logits - lse[..., None]) * d_ce[..., None]
  vocab = logits.shape[-1]
  flat = d_logits.reshape(-1, vocab)
  rows = jnp.arange(flat.shape[0])
  flat = flat.at[rows, labels.reshape(-1)].add(-d_ce.reshape(-1), indices_are_sorted=True,
                                                 unique_indices=True)
  return flat.reshape(logits.shape), None


_ce_and_hit.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy_and_hit(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position CE in float32 and top-1 hit (1.0 / 0.0): [..., V], [...] -> [...], [...].

  A hit is a label whose logit equals the maximum: a tie for the top counts as a hit
  (an argmax would pick the lowest id); with float32 logits ties are vanishingly rare.
  """
  return _ce_and_hit(logits.astype(jnp.float32), labels.astype(jnp.int32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-position CE in float32: logits [..., V], labels [...] -> [...]."""
  return cross_entropy_and_hit(logits, labels)[0]


def mtp_labels(batch: Batch, depth: int) -> tuple[jax.Array, jax.Array]:
  """(labels, mask) [batch, seq] of MTP depth `depth`: sequence.mtp_targets restricted to text."""
  labels, mask = seq_lib.mtp_targets(batch, depth)
  modality = batch["modality"]
  ahead = jnp.pad(modality[:, depth:], ((0, 0), (0, depth)), constant_values=-1)
  return labels, mask * ((modality == TEXT) & (ahead == TEXT)).astype(jnp.float32)


def posterior_weights(ema: jax.Array, losses: jax.Array, shares: jax.Array, *, decay: float
                      ) -> tuple[jax.Array, jax.Array]:
  """(new ema [M], weights [M]) of posterior weighting (module doc); inputs [M], no gradient."""
  losses = jax.lax.stop_gradient(losses)
  present = shares > 0
  updated = jnp.where(ema > 0, decay * ema + (1.0 - decay) * losses, losses)
  new_ema = jnp.where(present, updated, ema)
  mean = jnp.sum(shares * new_ema)
  weights = jnp.where(present, mean / jnp.where(present, new_ema, 1.0), 0.0)
  return new_ema, jax.lax.stop_gradient(weights)


def metric_modalities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Modalities that get metrics: the synthetic source's first num_modalities, else all."""
  if config.data.source == "synthetic":
    return MODALITIES[:config.data.num_modalities]
  return MODALITIES


def compute_loss(model: Any, batch: Batch, *, config: ml_collections.ConfigDict
                 ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """Returns (total, (metrics, aux)) of the objective; aux adds "loss_ema" [M] (new estimate)."""
  ob = config.objective
  audio_codes = batch.get("audio_codes")
  hidden, aux = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                    batch["group_ids"], audio_codes)  # [batch, seq, embed]
  logits = model.logits(hidden)  # [batch, seq, vocab] float32
  mask = batch["loss_mask"].astype(jnp.float32)  # [batch, seq]
  ce, hit = cross_entropy_and_hit(logits, batch["targets"])  # [batch, seq] each
  metrics: dict[str, jax.Array] = {"ce_loss": masked_mean(ce, mask)}

  masks = jnp.stack([mask * (batch["modality"] == m) for m in range(len(MODALITIES))])
  counts = jnp.sum(masks, axis=(1, 2))  # [M]
  main = jnp.sum(masks * ce, axis=(1, 2)) / jnp.maximum(counts, 1.0)  # [M]
  acc = jnp.sum(masks * hit, axis=(1, 2)) / jnp.maximum(counts, 1.0)
  modality_loss = list(main)  # L_m, before the auxiliary heads are added.

  def record(name: str, loss: jax.Array, accuracy: jax.Array, count: jax.Array) -> None:
    metrics[f"loss/{name}"], metrics[f"accuracy/{name}"] = loss, accuracy
    metrics[f"tokens/{name}"] = count

  # Text: multi-token prediction through the MTP modules and the shared output head.
  mtp_logits = model.mtp_logits(hidden, batch["tokens"], batch["positions"],
                                batch["segment_ids"], batch["group_ids"])
  if mtp_logits:
    mtp_losses = []
    for depth, d_logits in enumerate(mtp_logits, start=1):
      labels, d_mask = mtp_labels(batch, depth)
      d_ce, d_hit = cross_entropy_and_hit(d_logits, labels)
      d_loss = masked_mean(d_ce, d_mask)
      mtp_losses.append(d_loss)
      record(f"text_mtp{depth}", d_loss, masked_mean(d_hit, d_mask), jnp.sum(d_mask))
    modality_loss[TEXT] = modality_loss[TEXT] + ob.mtp_weight * jnp.mean(jnp.stack(mtp_losses))

  # Audio: levels 2..K from the audio heads, teacher-forced on the target frame's codes.
  audio_targets = batch.get("audio_targets")
  if audio_targets is not None:
    level_logits = model.audio_logits(hidden, batch["targets"], audio_targets)
    if level_logits is not None:  # [batch, seq, K - 1, codebook]
      n = level_logits.shape[2]
      labels = audio_targets[..., 1:n + 1]  # [batch, seq, K - 1]
      l_mask = mask[..., None] * (labels >= 0)
      labels = jnp.maximum(labels, 0)
      l_ce, l_hit = cross_entropy_and_hit(level_logits, labels)
      audio = int(seq_lib.Modality.AUDIO)
      for i in range(n):
        l_loss = masked_mean(l_ce[..., i], l_mask[..., i])
        record(f"audio_level{i + 2}", l_loss, masked_mean(l_hit[..., i], l_mask[..., i]),
               jnp.sum(l_mask[..., i]))
        modality_loss[audio] = modality_loss[audio] + ob.audio_level_weights[i] * l_loss

  modality_loss = jnp.stack(modality_loss)  # [M]
  shares = counts / jnp.maximum(jnp.sum(counts), 1.0)  # [M]
  ema = model.loss_ema[...]
  if ob.loss_weighting == "posterior":
    ema, weights = posterior_weights(ema, modality_loss, shares, decay=ob.loss_ema_decay)
  else:
    weights = (shares > 0).astype(jnp.float32)
  total = jnp.sum(shares * weights * modality_loss)
  r = config.router
  total = total + r.load_balance_weight * aux["load_balance_loss"] + \
      r.z_loss_weight * aux["z_loss"]

  for m, name in enumerate(metric_modalities(config)):
    record(name, main[m], acc[m], counts[m])
    metrics[f"loss_weight/{name}"] = weights[m]
    if ob.loss_weighting == "posterior":
      metrics[f"loss_ema/{name}"] = ema[m]
  metrics.update({"loss": total, "router/load_balance_loss": aux["load_balance_loss"],
                  "router/z_loss": aux["z_loss"]})
  aux["loss_ema"] = ema
  return total, (metrics, aux)
