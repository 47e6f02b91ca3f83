"""Losses against naive formulas and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from ernie5_jax.m2cp import losses


def _naive_nt_xent(za, zb, t):
  z = np.concatenate([za, zb])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(za)
  total = 0.0
  for i in range(n):
    pos = (i + b) % n
    denom = sum(np.exp(z[i] @ z[k] / t) for k in range(n) if k != i)
    total += -np.log(np.exp(z[i] @ z[pos] / t) / denom)
  return total / n


def test_nt_xent_matches_naive():
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(2, 5, 7))
  got = losses.nt_xent(jnp.asarray(za), jnp.asarray(zb), 0.5)
  np.testing.assert_allclose(got, _naive_nt_xent(za, zb, 0.5), rtol=1e-5)


def test_nt_xent_perfect_pairs_below_random():
  z = np.eye(4, 8) * 3
  assert losses.nt_xent(jnp.asarray(z), jnp.asarray(z), 0.5) < losses.nt_xent(
      jnp.asarray(z), jnp.asarray(np.roll(z, 1, 0)), 0.5)


def test_pseudo_labels_threshold():
  logits = jnp.log(jnp.array([[0.96, 0.02, 0.02], [0.94, 0.03, 0.03], [0.01, 0.01, 0.98]]))
  labels, mask = losses.confident_argmax(losses.mean_softmax(logits), 0.95)
  np.testing.assert_array_equal(labels, [0, 0, 2])
  np.testing.assert_array_equal(mask, [1, 0, 1])


def test_m2cp_loss_hand_computed():
  protos = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  f1 = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # cos: (1, 0), (0, 1), (.707, .707)
  labels = jnp.array([0, 0, 1])
  weights = jnp.array([1.0, 1.0, 0.0])  # Third row: an unconfident pseudo-label.
  t = 0.5
  # Row 0: CE([2, 0], 0) = log(1 + e^-2); row 1: CE([0, 2], 0) = log(1 + e^2).
  want = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(2.0))) / 2
  got = losses.m2cp_loss([f1, 5 * f1], protos, labels, weights, t)  # Scale-free: both equal.
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_weighted_and_plain():
  logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             (np.log(2) + np.log1p(np.exp(2.0))) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, jnp.array([1.0, 0.0])),
                             np.log(2), rtol=1e-6)


def test_rampup_sigmoid_shape():
  np.testing.assert_allclose(losses.rampup(jnp.array(0), 100), np.exp(-5), rtol=1e-6)
  np.testing.assert_allclose(losses.rampup(jnp.array(50), 100), np.exp(-1.25), rtol=1e-6)
  assert float(losses.rampup(jnp.array(300), 100)) == 1.0
  assert float(losses.rampup(jnp.array(0), 0)) == 1.0


def test_update_prototypes_ema_of_class_means():
  protos = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  fa = jnp.array([[0.0, 2.0], [1.0, 0.0], [5.0, 5.0]])
  fb = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  labels = jnp.array([0, 1, 1])
  weights = jnp.array([1.0, 1.0, 0.0])  # Row 2 does not count.
  got = np.asarray(losses.update_prototypes(protos, [fa, fb], labels, weights, 0.5))
  # Class 0: mean of unit (0, 1), (0, 1) -> (0, 1); 0.5 (1, 0) + 0.5 (0, 1) normalised.
  np.testing.assert_allclose(got[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-5)
  # Class 1: mean direction (1, 0); 0.5 (0, 1) + 0.5 (1, 0) normalised.
  np.testing.assert_allclose(got[1], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-5)
  np.testing.assert_allclose(got[2], [0.6, 0.8], rtol=1e-6)  # Absent class: unchanged.


def test_pseudo_label_ce_matches_fixmatch_formula():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 4))
  pseudo = np.array([0, 3, 1, 1, 2, 0])
  confident = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  # FixMatch Eq. 4: (1 / B) sum_b 1[max q_b >= tau] H(q_hat_b, p_b), B = all rows.
  naive = sum(c * -(l[p] - np.log(np.sum(np.exp(l)))) for l, p, c in
              zip(logits, pseudo, confident)) / len(logits)
  got = losses.pseudo_label_ce(jnp.asarray(logits), jnp.asarray(pseudo), jnp.asarray(confident))
  np.testing.assert_allclose(got, naive, rtol=1e-5)
  assert float(losses.pseudo_label_ce(jnp.asarray(logits), jnp.asarray(pseudo),
                                      jnp.zeros(6))) == 0.0


def test_align_distribution_matches_remixmatch_formula():
  rng = np.random.default_rng(2)
  probs = rng.dirichlet(np.ones(4), size=5)  # [B, C]
  prior = np.full(4, 0.25)
  running = np.array([0.4, 0.1, 0.25, 0.25])  # Class 0 over-predicted, class 1 under.
  naive = np.array([[p[c] * prior[c] / running[c] for c in range(4)] for p in probs])
  naive /= naive.sum(1, keepdims=True)
  got = np.asarray(losses.align_distribution(jnp.asarray(probs), jnp.asarray(prior),
                                             jnp.asarray(running)))
  np.testing.assert_allclose(got, naive, rtol=1e-5)
  assert (got[:, 0] < probs[:, 0]).all() and (got[:, 1] > probs[:, 1]).all()
  same = losses.align_distribution(jnp.asarray(probs), jnp.asarray(prior), jnp.asarray(prior))
  np.testing.assert_allclose(same, probs, rtol=1e-5)  # A calibrated model is left as is.


def test_update_running_mean_and_ensemble_pseudo_labels():
  probs = jnp.array([[0.7, 0.3], [0.1, 0.9]])
  np.testing.assert_allclose(losses.update_running_mean(jnp.array([0.5, 0.5]), probs, 0.9),
                             [0.9 * 0.5 + 0.1 * 0.4, 0.9 * 0.5 + 0.1 * 0.6], rtol=1e-6)
  a = jnp.log(jnp.array([[0.98, 0.02], [0.6, 0.4]]))
  b = jnp.log(jnp.array([[0.96, 0.04], [0.2, 0.8]]))
  labels, mask = losses.confident_argmax(losses.mean_softmax([a, b]), 0.95)  # Means: (0.97, 0.03), (0.4, 0.6).
  np.testing.assert_array_equal(labels, [0, 1])
  np.testing.assert_array_equal(mask, [1, 0])


def test_class_balance_is_kl_to_the_mean_prediction_linearised_at_its_average():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 4))
  prior = np.array([0.1, 0.2, 0.3, 0.4])
  running = np.array([0.4, 0.3, 0.2, 0.1])  # The model over-predicts class 0 over many steps.
  mean = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).mean(0)
  kl = lambda q: sum(p * np.log(p / qq) for p, qq in zip(prior, q))  # KL(prior || q)
  # First-order Taylor expansion of KL(prior || m) in m around the running mean.
  naive = kl(running) - sum(p * (m - r) / r for p, m, r in zip(prior, mean, running))
  got = losses.class_balance(jnp.asarray(logits), jnp.asarray(prior), jnp.asarray(running))
  np.testing.assert_allclose(got, naive, rtol=1e-5)
  # Equal to the KL itself where the batch's mean prediction is the running mean.
  at_r = losses.class_balance(jnp.log(jnp.asarray(running))[None], jnp.asarray(prior),
                              jnp.asarray(running))
  np.testing.assert_allclose(at_r, kl(running), rtol=1e-5)
  # Its gradient raises the under-predicted class 3 and lowers the over-predicted class 0 ...
  grad = np.asarray(jax.grad(losses.class_balance)(jnp.asarray(logits), jnp.asarray(prior),
                                                   jnp.asarray(running)))  # [B, C]
  assert (grad[:, 3] < 0).all() and (grad[:, 0] > 0).all()
  # ... and vanishes once the running mean is the prior, however uneven this batch is.
  flat = jax.grad(losses.class_balance)(jnp.asarray(logits), jnp.asarray(prior),
                                        jnp.asarray(prior))
  np.testing.assert_allclose(flat, 0.0, atol=1e-6)
