"""M2CP losses (Chen et al., BMVC 2021, Sec. 3.2-3.3) and the prototype update.

total = ce_weight * sum_m CE(classifier(f_m), y)             labelled rows, m in 3 modalities
      + fused_ce_weight * CE(fused([f_point, f_view, f_mesh]), y)
      + consistency_weight * mean_{pairs a<b} NT-Xent(z_a, z_b)     unlabelled rows, T = 0.5
      + ramp(step) * m2cp_weight * M2CP
M2CP = mean over modalities and over labelled rows + confident unlabelled rows of
CE(cos(f_m, P) / T_p, y or pseudo-label); pseudo-label = argmax of the fused classifier
(no gradient), kept when its probability >= pseudo_label_threshold.

Prototypes P [C, embed]: an exponential moving average of unit-normalised class means of
the (stop-gradient) unit-normalised features of all three modalities, over the rows
that enter the M2CP loss with their (pseudo-)label: after each step, for each class c
present in the batch, P_c <- normalise(momentum P_c + (1 - momentum) normalise(mean_c));
absent classes keep their prototype. They start as random unit vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x / |x| along the last axis."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
                  ) -> jax.Array:
  """Weighted mean softmax cross-entropy: logits [B, C], labels [B] int, weights [B] or None."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
  if weights is None:
    return jnp.mean(ce)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def nt_xent(za: jax.Array, zb: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent (Chen et al., ICML 2020, Eq. 1) between paired rows of za, zb [B, D].

  Row i of za and of zb are positives; the other 2B - 2 rows are negatives; the loss
  is the mean over all 2B anchors.
  """
  b = za.shape[0]
  z = l2_normalize(jnp.concatenate([za, zb], axis=0))  # [2B, D]
  sim = jnp.einsum("id,jd->ij", z, z) / temperature  # [2B, 2B]
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, sim)  # No self-pairs.
  positive = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])  # [2B]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim, positive))


def prototype_logits(features: jax.Array, prototypes: jax.Array, temperature: float
                     ) -> jax.Array:
  """Cosine similarities to the class prototypes over T: [B, E], [C, E] -> [B, C]."""
  return jnp.einsum("be,ce->bc", l2_normalize(features), l2_normalize(prototypes)) / temperature


def pseudo_labels(fused_logits: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
  """(argmax [B] int32, confident mask [B] float32: max softmax prob >= threshold); no grad."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(fused_logits), axis=-1)
  return jnp.argmax(probs, -1).astype(jnp.int32), (jnp.max(probs, -1) >= threshold).astype(
      jnp.float32)


def m2cp_loss(features: list[jax.Array], prototypes: jax.Array, labels: jax.Array,
              weights: jax.Array, temperature: float) -> jax.Array:
  """Mean over modalities of the weighted CE of prototype logits: features each [B, E]."""
  return jnp.mean(jnp.stack([
      cross_entropy(prototype_logits(f, prototypes, temperature), labels, weights)
      for f in features]))


def rampup(step: jax.Array, rampup_steps: int) -> jax.Array:
  """Sigmoid ramp-up exp(-5 (1 - t)^2), t = min(step / rampup_steps, 1) (Laine & Aila 2017)."""
  if rampup_steps == 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(step.astype(jnp.float32) / rampup_steps, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def update_prototypes(prototypes: jax.Array, features: list[jax.Array], labels: jax.Array,
                      weights: jax.Array, momentum: float) -> jax.Array:
  """EMA of unit class means (see the module docstring): prototypes [C, E], features [B, E]."""
  num_classes = prototypes.shape[0]
  onehot = jax.nn.one_hot(labels, num_classes) * weights[:, None]  # [B, C]
  feats = jnp.stack([l2_normalize(jax.lax.stop_gradient(f)) for f in features])  # [M, B, E]
  sums = jnp.einsum("bc,mbe->ce", onehot, feats)  # [C, E]
  counts = jnp.sum(onehot, axis=0) * len(features)  # [C]
  means = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
  moved = l2_normalize(momentum * prototypes + (1 - momentum) * means)
  return jnp.where((counts > 0)[:, None], moved, prototypes)
