"""Sampling (ernie5_jax/generate/sampling.py) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax.generate import sampling as S


def _np_nucleus(logits, top_p):
  """Ids kept by nucleus sampling, one row at a time (Holtzman et al. 2019, Sec. 3.1)."""
  out = []
  for row in np.asarray(logits, np.float64):
    order = np.argsort(-row)
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # Smallest prefix with mass >= top_p.
    out.append(set(order[:min(n, len(row))].tolist()))
  return out


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_filter_keeps_the_nucleus(top_p):
  logits = np.random.default_rng(0).normal(size=(6, 20)).astype(np.float32) * 2
  kept = np.isfinite(np.asarray(S.top_p_filter(jnp.asarray(logits), top_p)))
  for row, want in zip(kept, _np_nucleus(logits, top_p)):
    assert set(np.flatnonzero(row).tolist()) == want


def test_greedy_is_argmax_within_range():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3, 30)), jnp.float32)
  key = jax.random.key(0)
  np.testing.assert_array_equal(S.sample(key, logits, S.GREEDY), np.argmax(logits, -1))
  ranged = S.sample(key, logits, S.GREEDY, lo=10, hi=14)
  np.testing.assert_array_equal(ranged, 10 + np.argmax(np.asarray(logits)[..., 10:14], -1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_frequencies_match_tempered_softmax(temperature):
  logits = jnp.asarray([0.0, 1.0, -1.0, 2.0, 0.5, -3.0], jnp.float32)
  n = 20_000
  draw = jax.jit(jax.vmap(lambda k: S.sample(k, logits, S.Sampling(temperature, 1.0), lo=1,
                                             hi=5)))
  ids = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  assert ids.min() >= 1 and ids.max() < 5
  z = np.asarray(logits[1:5], np.float64) / temperature
  want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  np.testing.assert_allclose(np.bincount(ids - 1, minlength=4) / n, want, atol=0.015)


def test_top_p_draws_only_from_the_nucleus():
  logits = jnp.asarray([3.0, 2.9, 0.0, -1.0, -2.0], jnp.float32)
  draw = jax.jit(jax.vmap(lambda k: S.sample(k, logits, S.Sampling(1.0, 0.6))))
  ids = np.asarray(draw(jax.random.split(jax.random.key(1), 2_000)))
  assert set(ids.tolist()) == {0, 1}


def test_bad_parameters_are_named():
  with pytest.raises(ValueError, match="temperature=-1"):
    S.Sampling(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p=0"):
    S.Sampling(top_p=0.0)


def test_log_probs_are_the_distribution_sample_draws_from():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.5]])
  sampling = S.Sampling(temperature=0.7, top_p=0.8)
  logp = np.asarray(S.log_probs(logits, sampling, lo=1, hi=6))[0]
  # Reference: ids 1..5, logits / T, nucleus of mass 0.8, renormalised.
  z = np.asarray(logits[0, 1:6], np.float64) / 0.7
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  order = np.argsort(-p)
  keep = order[:int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)]
  want = np.full(7, -np.inf)
  want[1 + keep] = np.log(p[keep] / p[keep].sum())
  np.testing.assert_allclose(logp, want, rtol=1e-5)
  draws = jax.jit(jax.vmap(lambda k: S.sample(k, logits, sampling, lo=1, hi=6)))(
      jax.random.split(jax.random.key(0), 20000))[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=7) / 20000
  np.testing.assert_allclose(freq, np.exp(logp), atol=0.015)
  ids = jnp.asarray([[5]])
  np.testing.assert_allclose(float(S.token_log_probs(logits, ids[0], sampling, lo=1, hi=6)[0]),
                             logp[5], rtol=1e-6)
  greedy = np.asarray(S.log_probs(logits, S.GREEDY, lo=0, hi=5))[0]
  np.testing.assert_array_equal(greedy, [0.0] + [-np.inf] * 6)


def test_top_p_one_keeps_the_whole_tail():
  """At top_p = 1 no id is cut, even where the float32 cumulative mass reaches 1 early."""
  logits = jnp.asarray([[30.0, 0.0, -5.0, -40.0]])  # the tail's mass is below float32's ulp
  logp = np.asarray(S.log_probs(logits, S.Sampling(temperature=1.0, top_p=1.0)))
  assert np.isfinite(logp).all()
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(logits)), rtol=1e-6)
