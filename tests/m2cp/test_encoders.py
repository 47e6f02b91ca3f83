"""Encoders: output shapes, point-order invariance, kNN and edge conv against naive numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ernie5_jax.m2cp import encoders
from ernie5_jax.m2cp.model import M2CPModel

B, N, F, V, S = 2, 24, 16, 3, 8


def _tiny_model_cfg():
  return ml_collections.ConfigDict(dict(
      num_classes=5, embed_dim=512, proj_dim=16, pool_dim=8, point_channels=(8, 8), knn=4,
      dynamic_graph=True, view_channels=(4, 8), mesh_channels=8, mesh_conv_layers=1))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"points": jnp.asarray(rng.normal(size=(B, N, 3)), jnp.float32),
          "views": jnp.asarray(rng.integers(0, 255, (B, V, S, S)), jnp.uint8),
          "centers": jnp.asarray(rng.normal(size=(B, F, 3)), jnp.float32),
          "normals": jnp.asarray(rng.normal(size=(B, F, 3)), jnp.float32),
          "corners": jnp.asarray(rng.normal(size=(B, F, 9)), jnp.float32),
          "neighbors": jnp.asarray(rng.integers(0, F, (B, F, 3)), jnp.int32)}


@pytest.fixture(scope="module")
def model():
  return M2CPModel(_tiny_model_cfg(), S, rngs=nnx.Rngs(0))


def test_output_shapes(model, batch):
  out = model(batch)
  for m in ("point", "view", "mesh"):
    assert out[f"feat/{m}"].shape == (B, 512)
    assert out[f"logits/{m}"].shape == (B, 5)
    assert out[f"proj/{m}"].shape == (B, 16)
  assert out["logits/fused"].shape == (B, 5)
  assert model.prototypes.value.shape == (5, 512)
  np.testing.assert_allclose(np.linalg.norm(model.prototypes.value, axis=-1), 1, rtol=1e-5)


def test_point_encoder_is_invariant_to_point_order(model, batch):
  perm = np.random.default_rng(1).permutation(N)
  a = model.point(batch["points"])
  b = model.point(batch["points"][:, perm])
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mesh_encoder_is_invariant_to_face_order(model, batch):
  perm = np.random.default_rng(2).permutation(F)
  inv = np.argsort(perm)
  args = [batch[k] for k in ("centers", "normals", "corners")]
  a = model.mesh(*args, batch["neighbors"])
  b = model.mesh(*[x[:, perm] for x in args], jnp.asarray(inv)[batch["neighbors"][:, perm]])
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_knn_matches_naive_numpy():
  x = np.random.default_rng(3).normal(size=(2, 20, 5)).astype(np.float32)
  got = np.asarray(encoders.knn(jnp.asarray(x), 6))
  for b in range(2):
    for i in range(20):
      dist = [np.sum((x[b, i] - x[b, j]) ** 2) for j in range(20)]
      assert set(got[b, i]) == set(np.argsort(dist)[:6])
      assert got[b, i, 0] == i  # Self is the nearest.


def test_edge_conv_matches_naive_per_edge_formula():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 12, 3)).astype(np.float32)
  conv = encoders.EdgeConv(3, 4, rngs=nnx.Rngs(0))
  idx = encoders.knn(jnp.asarray(x), 5)
  got = np.asarray(conv(jnp.asarray(x), idx))
  phi_w, phi_b = np.asarray(conv.phi.kernel.value), np.asarray(conv.phi.bias.value)
  theta_w = np.asarray(conv.theta.kernel.value)
  want = np.zeros((2, 12, 4), np.float32)
  for b in range(2):
    for i in range(12):
      edges = []
      for j in np.asarray(idx[b, i]):
        pre = (x[b, j] - x[b, i]) @ theta_w + x[b, i] @ phi_w + phi_b  # DGCNN Eq. 8
        edges.append(np.where(pre > 0, pre, 0.2 * pre))
      h = np.max(edges, axis=0)
      want[b, i] = (h - h.mean()) / np.sqrt(h.var() + 1e-6)  # LayerNorm at init.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_edge_features_layout():
  x = jnp.arange(2 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 2)
  idx = jnp.array([[[1, 2]] * 4, [[3, 0]] * 4])
  e = encoders.edge_features(x, idx)
  assert e.shape == (2, 4, 2, 4)
  np.testing.assert_array_equal(e[1, 2, 0], np.r_[x[1, 2], x[1, 3] - x[1, 2]])


def test_view_encoder_shape():
  enc = encoders.ViewEncoder((4,), 6, 8, 32, rngs=nnx.Rngs(0))
  out = enc(jnp.zeros((3, 12, 6, 6), jnp.uint8))
  assert out.shape == (3, 32)
  assert jax.numpy.isfinite(out).all()
