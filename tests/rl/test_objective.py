"""Tests for ernie5_jax/rl/objective.py against naive per-element Python formulas."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax.rl import objective as obj

P, G, S, V = 3, 4, 6, 5
N = P * G
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def data():
  """Rollout-like arrays whose ratios fall below, inside and above the clip range."""
  rng = np.random.default_rng(0)
  logp_old = -rng.uniform(0.1, 3.0, size=(N, S)).astype(np.float32)
  # A per-sequence shift (spread wide enough to clip on both sides) plus token noise.
  shift = np.linspace(-0.6, 0.6, N)[rng.permutation(N)]
  logp_new = (logp_old + shift[:, None] + 0.05 * rng.normal(size=(N, S))).astype(np.float32)
  lengths = rng.integers(1, S + 1, size=N)
  lengths[5] = 0  # one rollout without counted tokens
  mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.float32)
  rewards = rng.integers(0, 2, size=N).astype(np.float32)
  rewards[:G] = 1.0  # a group with equal rewards
  adv = rng.normal(size=N).astype(np.float32)  # both signs
  weights = rng.uniform(0.2, 1.0, size=N).astype(np.float32)
  logp_infer = (logp_old + 0.3 * rng.normal(size=(N, S))).astype(np.float32)
  return dict(logp_old=logp_old, logp_new=logp_new, mask=mask, rewards=rewards, adv=adv,
              weights=weights, logp_infer=logp_infer)


def naive_seq_log_ratio(new, old, mask):
  out = []
  for i in range(new.shape[0]):
    terms = [float(new[i, t]) - float(old[i, t]) for t in range(new.shape[1]) if mask[i, t]]
    out.append(sum(terms) / len(terms) if terms else 0.0)
  return out


def naive_gspo(new, old, mask, adv, weights, cl, ch):
  """Loss, dloss/dlogp_new and clip fraction, one sequence at a time."""
  log_s = naive_seq_log_ratio(new, old, mask)
  valid = [i for i in range(new.shape[0]) if mask[i].sum() > 0]
  loss, grad, clipped = 0.0, np.zeros(new.shape), 0
  for i in valid:
    s = math.exp(log_s[i])
    unclipped, clipped_term = s * adv[i], min(max(s, 1 - cl), 1 + ch) * adv[i]
    loss -= weights[i] * min(unclipped, clipped_term) / len(valid)
    clipped += s < 1 - cl or s > 1 + ch
    if unclipped <= clipped_term:  # the gradient flows only through the unclipped branch
      for t in range(new.shape[1]):
        if mask[i, t]:
          grad[i, t] = -weights[i] * adv[i] * s / mask[i].sum() / len(valid)
  return loss, grad, clipped / len(valid)


def test_group_advantages(data):
  got = np.asarray(obj.group_advantages(data["rewards"], G, eps=1e-6))
  for p in range(P):
    r = [float(x) for x in data["rewards"][p * G:(p + 1) * G]]
    mean = sum(r) / G
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / G)
    for g in range(G):
      np.testing.assert_allclose(got[p * G + g], (r[g] - mean) / (std + 1e-6), rtol=1e-5,
                                 atol=1e-6)
  np.testing.assert_array_equal(got[:G], 0.0)  # equal rewards: no signal
  with pytest.raises(ValueError, match="group_size=5"):
    obj.group_advantages(data["rewards"], 5)


def test_sequence_log_ratio(data):
  got = obj.sequence_log_ratio(data["logp_new"], data["logp_old"], data["mask"])
  want = naive_seq_log_ratio(data["logp_new"], data["logp_old"], data["mask"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_weights", [False, True])
def test_gspo_loss_and_gradient(data, use_weights):
  w = data["weights"] if use_weights else np.ones(N, np.float32)
  kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
            weights=data["weights"] if use_weights else None)
  loss, metrics = obj.gspo_loss(data["logp_new"], data["logp_old"], data["mask"], data["adv"], **kw)
  want_loss, want_grad, want_clip = naive_gspo(data["logp_new"], data["logp_old"], data["mask"],
                                               data["adv"], w, CLIP_LOW, CLIP_HIGH)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction"], want_clip, atol=1e-6)
  s = np.exp(naive_seq_log_ratio(data["logp_new"], data["logp_old"], data["mask"]))
  valid = data["mask"].sum(-1) > 0
  # The fixture must exercise both clip sides, with both advantage signs.
  assert (s[valid] < 1 - CLIP_LOW).any() and (s[valid] > 1 + CLIP_HIGH).any()
  assert (data["adv"] < 0).any() and (data["adv"] > 0).any()
  assert 0 < want_clip < 1
  np.testing.assert_allclose(metrics["ratio_mean"], s[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_min"], s[valid].min(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max"], s[valid].max(), rtol=1e-5)

  # Gradient: the naive one through logp_new, none through anything else.
  def f(new, old, mask, adv, weights):
    return obj.gspo_loss(new, old, mask, adv, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                         weights=weights)[0]
  grads = jax.grad(f, argnums=(0, 1, 2, 3, 4))(data["logp_new"], data["logp_old"], data["mask"],
                                                data["adv"], jnp.asarray(w))
  np.testing.assert_allclose(grads[0], want_grad, rtol=1e-4, atol=1e-7)
  assert np.abs(want_grad).sum() > 0
  for g in grads[1:]:
    np.testing.assert_array_equal(g, 0.0)


def test_gspo_misc_mask_removes_tokens(data):
  """MISC through the mask: dropped tokens leave the mean, their logp_new has no effect."""
  keep = obj.misc_mask(data["logp_old"], data["logp_infer"], data["mask"], alpha=0.8, beta=1.25)
  keep = np.asarray(keep)
  assert 0 < keep.sum() < data["mask"].sum()
  loss, _ = obj.gspo_loss(data["logp_new"], data["logp_old"], keep, data["adv"],
                          clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
  want, _, _ = naive_gspo(data["logp_new"], data["logp_old"], keep, data["adv"], np.ones(N),
                          CLIP_LOW, CLIP_HIGH)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  perturbed = data["logp_new"] + 5.0 * (1.0 - keep)
  loss2, _ = obj.gspo_loss(perturbed, data["logp_old"], keep, data["adv"],
                           clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_gspo_jit_and_bad_clip(data):
  f = jax.jit(functools.partial(obj.gspo_loss, clip_low=CLIP_LOW, clip_high=CLIP_HIGH))
  loss, _ = f(data["logp_new"], data["logp_old"], data["mask"], data["adv"])
  eager, _ = obj.gspo_loss(data["logp_new"], data["logp_old"], data["mask"], data["adv"],
                           clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
  np.testing.assert_allclose(loss, eager, rtol=1e-6)
  with pytest.raises(ValueError, match="clip_low=1.5"):
    obj.gspo_loss(data["logp_new"], data["logp_old"], data["mask"], data["adv"], clip_low=1.5,
                  clip_high=0.2)


def test_token_clip_loss(data):
  new, old, mask, adv, w = (data[k] for k in ("logp_new", "logp_old", "mask", "adv", "weights"))
  loss, metrics = obj.token_clip_loss(new, old, mask, adv, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                      weights=w)
  valid = [i for i in range(N) if mask[i].sum() > 0]
  want, clipped, tokens, ratio_sum = 0.0, 0, 0, 0.0
  want_grad = np.zeros((N, S))
  for i in valid:
    per_seq, n_i = 0.0, mask[i].sum()
    for t in range(S):
      if not mask[i, t]:
        continue
      r = math.exp(float(new[i, t]) - float(old[i, t]))
      unclipped, clipped_term = r * adv[i], min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH) * adv[i]
      per_seq += min(unclipped, clipped_term) / n_i
      clipped += r < 1 - CLIP_LOW or r > 1 + CLIP_HIGH
      tokens += 1
      ratio_sum += r
      if unclipped <= clipped_term:
        want_grad[i, t] = -w[i] * adv[i] * r / n_i / len(valid)
    want -= w[i] * per_seq / len(valid)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction"], clipped / tokens, atol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], ratio_sum / tokens, rtol=1e-5)
  assert 0 < clipped < tokens

  def f(new, old):
    return obj.token_clip_loss(new, old, mask, adv, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                               weights=w)[0]
  g_new, g_old = jax.grad(f, argnums=(0, 1))(new, old)
  np.testing.assert_allclose(g_new, want_grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(g_old, 0.0)


def test_misc_mask(data):
  alpha, beta = 0.8, 1.25
  got = np.asarray(obj.misc_mask(data["logp_old"], data["logp_infer"], data["mask"], alpha=alpha,
                                 beta=beta))
  assert got.dtype == np.float32
  want = np.zeros((N, S))
  for i in range(N):
    for t in range(S):
      ratio = math.exp(float(data["logp_old"][i, t]) - float(data["logp_infer"][i, t]))
      want[i, t] = float(data["mask"][i, t] == 1 and alpha <= ratio <= beta)
  np.testing.assert_array_equal(got, want)
  dropped = obj.masked_fraction(data["mask"], got)
  np.testing.assert_allclose(dropped, 1 - want.sum() / data["mask"].sum(), rtol=1e-6)
  assert 0 < float(dropped) < 1  # both sides of the band drop something here
  ratio = np.exp(data["logp_old"] - data["logp_infer"])[data["mask"] > 0]
  assert (ratio < alpha).any() and (ratio > beta).any()
  with pytest.raises(ValueError, match="alpha=2"):
    obj.misc_mask(data["logp_old"], data["logp_infer"], data["mask"], alpha=2.0, beta=1.0)


def naive_wpsm(rewards, entropy, tau, eta, a, success):
  out = []
  for p in range(len(rewards) // G):
    r = [float(x) for x in rewards[p * G:(p + 1) * G]]
    h = [float(x) for x in entropy[p * G:(p + 1) * G]]
    pass_rate = sum(x >= success for x in r) / G
    well = pass_rate > tau and sum(h) / G < eta
    mean = sum(r) / G
    out += [1 - a if well and x > mean else 1.0 for x in r]
  return out


def test_wpsm_weights():
  tau, eta, a = 0.5, 1.0, 0.7
  rewards = np.array([1, 1, 1, 0,    # solved 3/4, low entropy   -> positives down-weighted
                      1, 1, 1, 0,    # solved 3/4, high entropy  -> untouched
                      1, 0, 0, 0,    # pass 1/4 <= tau, low entr -> untouched
                      1, 1, 1, 1,    # all solved: no positive advantage -> untouched
                      0.5, 1, 1, 0.9],  # partial rewards: pass 2/4 not > tau -> untouched
                     np.float32)
  entropy = np.array([0.2] * 4 + [2.0] * 4 + [0.2] * 4 + [0.2] * 4 + [0.1] * 4, np.float32)
  got = np.asarray(obj.wpsm_weights(rewards, G, entropy, solved_threshold=tau,
                                    entropy_threshold=eta, down_weight=a))
  np.testing.assert_allclose(got, naive_wpsm(rewards, entropy, tau, eta, a, 1.0), rtol=1e-6)
  np.testing.assert_allclose(got[:4], [1 - a] * 3 + [1.0], rtol=1e-6)
  np.testing.assert_array_equal(got[4:], 1.0)
  # Random rewards in [0, 1] with a lower success threshold.
  rng = np.random.default_rng(1)
  r = rng.uniform(size=4 * G).astype(np.float32)
  h = rng.uniform(0, 2, size=4 * G).astype(np.float32)
  got = obj.wpsm_weights(r, G, h, solved_threshold=0.25, entropy_threshold=1.2, down_weight=0.5,
                         success=0.4)
  np.testing.assert_allclose(got, naive_wpsm(r, h, 0.25, 1.2, 0.5, 0.4), rtol=1e-6)
  np.testing.assert_allclose(obj.pass_rates(rewards, G), [0.75, 0.75, 0.25, 1.0, 0.5])


def test_hint_fraction():
  np.testing.assert_allclose(obj.hint_fraction(0, 0.7, p0=0.5, gamma=0.1), 0.5)
  np.testing.assert_allclose(obj.hint_fraction(10, 0.0, p0=0.5, gamma=0.1), 0.5)
  np.testing.assert_allclose(obj.hint_fraction(10, 0.5, p0=0.5, gamma=0.1), 0.5 * math.exp(-0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(obj.hint_fraction(3, np.array([0.0, 0.5, 1.0]), p0=0.8, gamma=0.2),
                             [0.8 * math.exp(-0.2 * 3 * p) for p in (0.0, 0.5, 1.0)], rtol=1e-6)
  np.testing.assert_allclose(obj.hint_fraction(0, 1.0, p0=1.5, gamma=0.1), 1.0)  # clipped
  np.testing.assert_allclose(obj.hint_fraction(0, 1.0, p0=-0.1, gamma=0.1), 0.0)


def test_mismatch_kl(data):
  old, infer, mask = data["logp_old"], data["logp_infer"], data["mask"]
  np.testing.assert_allclose(obj.mismatch_kl(old, old, mask), 0.0, atol=1e-7)
  got = obj.mismatch_kl(old, infer, mask)
  terms, k1 = [], []
  for i in range(N):
    for t in range(S):
      if mask[i, t]:
        r = math.exp(float(old[i, t]) - float(infer[i, t]))
        terms.append(r - 1 - math.log(r))
        k1.append(float(infer[i, t]) - float(old[i, t]))
  np.testing.assert_allclose(got, sum(terms) / len(terms), rtol=1e-5)
  assert float(got) > 0
  m = obj.mismatch_metrics(old, infer, mask)
  np.testing.assert_allclose(m["kl_k3"], got, rtol=1e-6)
  np.testing.assert_allclose(m["kl_k1"], sum(k1) / len(k1), rtol=1e-5, atol=1e-7)
  # Masked tokens do not count: a huge difference there changes nothing.
  spoiled = infer + 10.0 * (1 - mask)
  np.testing.assert_allclose(obj.mismatch_kl(old, spoiled, mask), got, rtol=1e-6)


def test_token_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, V)).astype(np.float32)
  got = np.asarray(obj.token_entropy(logits))
  for i in range(2):
    for t in range(3):
      z = np.exp(logits[i, t].astype(np.float64) - logits[i, t].max())
      p = z / z.sum()
      np.testing.assert_allclose(got[i, t], -(p * np.log(p)).sum(), rtol=1e-5)
  np.testing.assert_allclose(obj.token_entropy(np.zeros((1, 1, V))), [[math.log(V)]], rtol=1e-6)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  np.testing.assert_allclose(obj.masked_sequence_mean(got, mask), [got[0, :2].mean(), 0.0],
                             rtol=1e-6)
