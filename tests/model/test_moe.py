"""Tests for the MoE layer: output and gradients against a dense per-token loop reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ernie5_jax.model.moe import MoE

BATCH, SEQ, D_MODEL, EXPERTS, HIDDEN, TOP_K = 2, 8, 32, 8, 16, 2


def moe_config(score, shared):
  return ml_collections.ConfigDict(dict(
      d_model=D_MODEL, num_experts=EXPERTS, expert_hidden=HIDDEN, top_k=TOP_K,
      num_shared_experts=shared, router_score=score, moe_dispatch="auto",
      capacity_factor=1.25))


def silu(z):
  return z * jax.nn.sigmoid(z)


def reference_moe(params, x, ids, score):
  """Routes each token through its own top-k experts (one token at a time, vmapped)."""
  xf = x.reshape(-1, D_MODEL)  # [tokens, embed]
  logits = xf @ params["router"]  # [tokens, experts]
  scores = jax.nn.softmax(logits, -1) if score == "softmax" else jax.nn.sigmoid(logits)

  def one_token(x_t, scores_t, ids_t):  # [embed], [experts], [top_k]
    sel = scores_t[ids_t]
    weights = sel / jnp.sum(sel)  # renormalised over the selected experts, no bias
    y_t = jnp.zeros((D_MODEL,))
    for k in range(TOP_K):
      e = ids_t[k]
      h = silu(x_t @ params["w_gate"][e]) * (x_t @ params["w_up"][e])
      y_t = y_t + weights[k] * (h @ params["w_down"][e])
    if "shared_gate" in params:
      h = silu(x_t @ params["shared_gate"]) * (x_t @ params["shared_up"])
      y_t = y_t + h @ params["shared_down"]
    return y_t

  return jax.vmap(one_token)(xf, scores, jnp.asarray(ids)).reshape(x.shape)


NAMES = {("router", "kernel"): "router", ("experts", "w_gate"): "w_gate",
         ("experts", "w_up"): "w_up", ("experts", "w_down"): "w_down",
         ("shared", "w_gate"): "shared_gate", ("shared", "w_up"): "shared_up",
         ("shared", "w_down"): "shared_down"}


def param_dict(state):
  """Flat {reference name: array} from an MoE module's Param state (or its gradient)."""
  return {NAMES[path]: v[...] for path, v in nnx.to_flat_state(state)}


def build_moe(score, shared):
  """An MoE layer with numpy parameters (no XLA init kernels to compile) and a test bias."""
  abstract = nnx.eval_shape(lambda: MoE(moe_config(score, shared), dtype=jnp.float32,
                                        param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params)
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
  moe = nnx.merge(graphdef, params, rest)
  moe.router.bias[...] = jnp.linspace(0.2, 0.0, EXPERTS)  # the bias changes some selections
  return moe


def numpy_expert_ids(params, bias, x, score):
  """Top-k of score + bias, computed directly in numpy: [tokens, top_k]."""
  logits = np.asarray(x, np.float64).reshape(-1, D_MODEL) @ np.asarray(params["router"])
  if score == "softmax":
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  return np.argsort(-(scores + bias), axis=-1, kind="stable")[:, :TOP_K].tolist()


@pytest.fixture(scope="module", params=[("softmax", 1), ("sigmoid", 0)],
                ids=["softmax-shared", "sigmoid"])
def case(request):
  score, shared = request.param
  moe = build_moe(score, shared)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(BATCH, SEQ, D_MODEL)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(BATCH, SEQ, D_MODEL)), jnp.float32)

  def loss(m, x):
    y, stats = m(x)
    return jnp.sum(y * cotangent), (y, stats)
  (_, (y, stats)), (grads, dx) = nnx.jit(
      nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(moe, x)

  params = param_dict(nnx.state(moe, nnx.Param))
  ids = numpy_expert_ids(params, np.asarray(moe.router.bias[...]), x, score)

  def ref_loss(params, x):
    y = reference_moe(params, x, ids, score)
    return jnp.sum(y * cotangent), y
  (_, ref_y), (ref_grads, ref_dx) = jax.jit(
      jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(params, x)
  return dict(moe=moe, y=y, stats=stats, grads=grads, dx=dx, ref_y=ref_y,
              ref_grads=ref_grads, ref_dx=ref_dx)


def test_output_matches_reference(case):
  assert case["y"].shape == (BATCH, SEQ, D_MODEL) and case["y"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(case["y"]), np.asarray(case["ref_y"]),
                             rtol=1e-4, atol=1e-5)


def test_gradients_match_reference(case):
  np.testing.assert_allclose(np.asarray(case["dx"]), np.asarray(case["ref_dx"]),
                             rtol=1e-4, atol=1e-5)
  grads = param_dict(case["grads"])
  assert set(grads) == set(case["ref_grads"])
  for name, ref in case["ref_grads"].items():
    np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(ref), rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_stats_and_axis_names(case):
  moe, stats = case["moe"], case["stats"]
  np.testing.assert_allclose(float(jnp.sum(stats["expert_load"])), BATCH * SEQ * TOP_K)
  names = {path: v.get_metadata()["out_sharding"]
           for path, v in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
  assert names[("experts", "w_gate")] == ("expert", "embed", "expert_mlp")
  assert names[("experts", "w_down")] == ("expert", "expert_mlp", "embed")
  assert names[("router", "kernel")] == ("embed", "expert")
  if moe.shared is not None:
    assert moe.shared.w_gate.shape == (D_MODEL, HIDDEN)  # one shared expert
    assert names[("shared", "w_down")] == ("mlp", "embed")
