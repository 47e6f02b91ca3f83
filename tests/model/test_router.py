"""Tests for the router, its bias update and its statistics against direct numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax.model import router as router_lib

TOKENS, D_MODEL, EXPERTS, TOP_K = 16, 32, 8, 2


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_routing(x, kernel, bias, score):
  """Direct numpy routing: select on score + bias, weights = renormalised scores."""
  logits = x.astype(np.float64) @ kernel.astype(np.float64)
  scores = np_softmax(logits) if score == "softmax" else 1 / (1 + np.exp(-logits))
  ids = np.argsort(-(scores + bias), axis=-1, kind="stable")[:, :TOP_K]
  sel = np.take_along_axis(scores, ids, -1)
  return logits, scores, ids, sel / sel.sum(-1, keepdims=True)


@pytest.fixture(scope="module", params=["softmax", "sigmoid"])
def setup(request):
  score = request.param
  router = router_lib.Router(D_MODEL, EXPERTS, TOP_K, score=score, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  # A bias that clearly changes the selection: it must not leak into the weights.
  router.bias[...] = jnp.linspace(0.0, 0.3, EXPERTS)
  x = np.random.default_rng(0).normal(size=(TOKENS, D_MODEL)).astype(np.float32)
  out = nnx.jit(lambda r, x: r(x))(router, x)
  return score, router, x, out


def test_selection_and_combine_weights(setup):
  score, router, x, out = setup
  _, scores, ids, weights = np_routing(x, np.asarray(router.kernel[...]),
                                       np.asarray(router.bias[...]), score)
  assert out.expert_ids.dtype == jnp.int32 and out.expert_ids.shape == (TOKENS, TOP_K)
  assert out.combine_weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
  np.testing.assert_allclose(np.asarray(out.combine_weights), weights, rtol=1e-5, atol=1e-6)
  # Without the bias the selection differs for some tokens (the test bias matters).
  assert (np.argsort(-scores, -1, kind="stable")[:, :TOP_K] != ids).any()


def test_statistics_match_formulas(setup):
  score, router, x, out = setup
  logits, scores, ids, _ = np_routing(x, np.asarray(router.kernel[...]),
                                      np.asarray(router.bias[...]), score)
  probs = scores / scores.sum(-1, keepdims=True)  # identity for softmax
  load = np.zeros(EXPERTS)
  for t in range(TOKENS):
    for k in range(TOP_K):
      load[ids[t, k]] += 1
  f = load / (TOKENS * TOP_K)
  lb = EXPERTS * np.sum(f * probs.mean(0))
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  entropy = np.mean(-np.sum(probs * np.log(probs), -1)) / np.log(EXPERTS)
  np.testing.assert_array_equal(np.asarray(out.expert_load), load)
  np.testing.assert_allclose(float(out.load_balance_loss), lb, rtol=1e-5)
  np.testing.assert_allclose(float(out.z_loss), z, rtol=1e-5)
  np.testing.assert_allclose(float(out.router_entropy), entropy, rtol=1e-5)
  per_token = -np.sum(probs * np.log(probs), -1) / np.log(EXPERTS)  # [tokens]
  np.testing.assert_allclose(np.asarray(out.token_entropy), per_token, rtol=1e-5)
  assert set(out.stats()) == {"expert_load", "router_entropy", "load_balance_loss", "z_loss",
                              "token_entropy"}


def test_balanced_uniform_routing_has_unit_loss_and_entropy():
  probs = jnp.full((TOKENS, EXPERTS), 1.0 / EXPERTS)
  ids = jnp.arange(TOKENS * TOP_K).reshape(TOKENS, TOP_K) % EXPERTS
  load = router_lib.expert_load(ids, EXPERTS)
  np.testing.assert_array_equal(np.asarray(load), np.full(EXPERTS, TOKENS * TOP_K / EXPERTS))
  np.testing.assert_allclose(float(router_lib.load_balance_loss(probs, load, TOP_K)), 1.0)
  np.testing.assert_allclose(float(router_lib.router_entropy(probs)), 1.0, rtol=1e-6)


def test_bias_is_not_a_param_and_gets_no_gradient(setup):
  _, router, x, _ = setup
  assert isinstance(router.bias, router_lib.RouterBias)
  assert not isinstance(router.bias, nnx.Param)
  assert router.bias.get_metadata()["out_sharding"] == ("expert",)
  grads = nnx.jit(nnx.grad(lambda r: jnp.sum(r(x).combine_weights ** 2) + r(x).z_loss))(router)
  assert [path for path, _ in nnx.to_flat_state(grads)] == [("kernel",)]


def test_update_router_bias_matches_rule():
  rate = 0.01
  bias = np.array([[0.0, 0.1, -0.2, 0.3], [0.5, 0.0, 0.0, -0.5]], np.float32)
  load = np.array([[4.0, 4.0, 4.0, 4.0], [1.0, 7.0, 4.0, 4.0]], np.float32)  # mean 4 each
  expected = bias.copy()
  for layer in range(2):
    mean = load[layer].mean()
    for e in range(4):
      if load[layer, e] < mean:
        expected[layer, e] += rate  # underloaded: more likely to be selected
      elif load[layer, e] > mean:
        expected[layer, e] -= rate
  new = np.asarray(router_lib.update_router_bias(jnp.asarray(bias), jnp.asarray(load), rate))
  np.testing.assert_allclose(new, expected, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(new[0], bias[0])  # equal load: sign(0) = 0, no change
  one = router_lib.update_router_bias(jnp.asarray(bias[1]), jnp.asarray(load[1]), rate)
  np.testing.assert_allclose(np.asarray(one), expected[1], atol=1e-7)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="router_score='relu'"):
    router_lib.Router(D_MODEL, EXPERTS, TOP_K, score="relu", param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="top_k=9"):
    router_lib.Router(D_MODEL, EXPERTS, 9, score="softmax", param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
