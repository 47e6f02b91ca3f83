"""Tests for RMSNorm, embedding / tied head, untied head, matmul and the dense SwiGLU MLP."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax.aot import hlo as hlo_lib
from ernie5_jax.model import layers

D_MODEL, HIDDEN, VOCAB = 32, 48, 64


def rngs():
  return nnx.Rngs(jax.random.key(0, impl="rbg"))  # rbg: cheap random kernels on CPU


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, D_MODEL)), jnp.float32)


@nnx.jit
def call(module, *args):
  return module(*args)


def test_rms_norm_matches_numpy(x):
  norm = layers.RMSNorm(D_MODEL, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                        rngs=rngs())
  norm.scale[...] = jnp.linspace(0.5, 1.5, D_MODEL)
  out = call(norm, x)
  xn = np.asarray(x)
  expected = xn / np.sqrt(np.mean(xn ** 2, -1, keepdims=True) + 1e-6)
  expected = expected * np.linspace(0.5, 1.5, D_MODEL)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2)
  assert norm.scale.get_metadata()["out_sharding"] == ("embed",)


def test_embedding_lookup_and_tied_head(x):
  embed = layers.Embed(VOCAB, D_MODEL, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs())
  table = np.asarray(embed.table[...])
  tokens = jnp.asarray([[0, 5, 63], [7, 7, 1]], jnp.int32)
  np.testing.assert_allclose(np.asarray(call(embed, tokens)),
                             table[np.asarray(tokens)] * np.sqrt(D_MODEL), rtol=1e-6)
  logits = nnx.jit(lambda e, h: e.attend(h))(embed, x)
  assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ table.T, rtol=1e-5, atol=1e-5)
  assert embed.table.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_untied_head(x):
  head = layers.OutputHead(D_MODEL, VOCAB, param_dtype=jnp.float32, rngs=rngs())
  np.testing.assert_allclose(np.asarray(call(head, x)),
                             np.asarray(x) @ np.asarray(head.kernel[...]), rtol=1e-5, atol=1e-5)


def test_swiglu_mlp_matches_numpy(x):
  mlp = layers.MLP(D_MODEL, HIDDEN, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs())
  wg, wu, wd = (np.asarray(p[...], np.float64) for p in (mlp.w_gate, mlp.w_up, mlp.w_down))
  xn = np.asarray(x, np.float64)
  gate = xn @ wg
  expected = (gate / (1 + np.exp(-gate)) * (xn @ wu)) @ wd
  np.testing.assert_allclose(np.asarray(call(mlp, x)), expected, rtol=1e-4, atol=1e-5)
  assert mlp.w_gate.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert mlp.w_down.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_matmul_gradients_and_plain_weight_gradient_dot(x):
  """matmul's gradients match numpy's, and on CPU its compiled backward has no dot that
  contracts the token dim of both operands (XLA:CPU runs those off its fast dot path)."""
  w = jnp.asarray(np.random.default_rng(1).normal(size=(D_MODEL, 2, HIDDEN // 2)), jnp.float32)
  d_y = np.random.default_rng(2).normal(size=(2, 8, 2, HIDDEN // 2))

  def loss(x, w):
    return jnp.sum(layers.matmul(x, w) * d_y)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  d_x, d_w = grad(x, w)
  x2, w2 = np.asarray(x, np.float64).reshape(16, D_MODEL), np.asarray(w, np.float64)
  g2 = d_y.reshape(16, HIDDEN)
  np.testing.assert_allclose(np.asarray(d_x), (g2 @ w2.reshape(D_MODEL, HIDDEN).T).reshape(
      x.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d_w), (x2.T @ g2).reshape(w.shape), rtol=1e-5,
                             atol=1e-5)
  hlo = grad.lower(x, w).compile().as_text()
  dots = [line for lines in hlo_lib.computations(hlo)[0].values() for line in lines
          if re.search(r" dot\(", line)]
  assert dots and not [d for d in dots if "lhs_contracting_dims={0}" in d
                       and "rhs_contracting_dims={0}" in d], dots


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="dtype='float16'"):
    layers.to_dtype("float16")
  with pytest.raises(ValueError, match="names=\\('embed',\\)"):
    layers.param(rngs(), jax.nn.initializers.zeros, (2, 3), ("embed",), jnp.float32)
