"""The three modality encoders of M2CP, each mapping one object to an embed_dim feature.

- PointEncoder: DGCNN-like (Wang et al., "Dynamic Graph CNN", TOG 2019): edge
  convolutions over the k nearest neighbours, recomputed in feature space per layer.
- ViewEncoder: MVCNN-like (Su et al., ICCV 2015): one CNN shared across the views,
  view features max-pooled.
- MeshEncoder: MeshNet-like (Feng et al., AAAI 2019): a spatial descriptor of face
  centres, a structural descriptor of corner vectors (face rotate convolution) and
  normals, then mesh convolutions over the edge-adjacent faces; max-pooled over faces.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def knn(x: jax.Array, k: int) -> jax.Array:
  """Indices of the k nearest points (self included) by squared L2: [B, N, C] -> [B, N, k]."""
  sq = jnp.sum(x * x, axis=-1)  # [B, N]
  # -|xi - xj|^2 = 2 xi.xj - |xi|^2 - |xj|^2
  neg_dist = 2 * jnp.einsum("bnc,bmc->bnm", x, x) - sq[:, :, None] - sq[:, None, :]
  return jax.lax.top_k(neg_dist, k)[1]


def gather_neighbors(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[b, idx[b, n, j]]: x [B, N, C], idx [B, N, k] -> [B, N, k, C]."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def edge_features(x: jax.Array, idx: jax.Array) -> jax.Array:
  """DGCNN edge features [x_i, x_j - x_i]: x [B, N, C], idx [B, N, k] -> [B, N, k, 2C]."""
  nbr = gather_neighbors(x, idx)  # [B, N, k, C]
  center = jnp.broadcast_to(x[:, :, None, :], nbr.shape)
  return jnp.concatenate([center, nbr - center], axis=-1)


class EdgeConv(nnx.Module):
  """h_i = LN(max_j leaky_relu(theta (x_j - x_i) + phi x_i)) over the kNN graph (DGCNN Eq. 8)."""

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.phi = nnx.Linear(in_dim, out_dim, rngs=rngs)  # On x_i.
    self.theta = nnx.Linear(in_dim, out_dim, use_bias=False, rngs=rngs)  # On x_j - x_i.
    self.norm = nnx.LayerNorm(out_dim, rngs=rngs)

  def __call__(self, x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, C], idx [B, N, k] -> [B, N, out]."""
    # theta (x_j - x_i) + phi x_i = theta x_j + (phi - theta) x_i: both terms are per point,
    # and leaky_relu is monotone, so the max over j moves inside onto theta x_j alone. This
    # is the exact edge-conv value without materialising [B, N, k, out] pre-activations.
    tx = self.theta(x)  # [B, N, out]
    center = self.phi(x) - tx
    nbr_max = jnp.max(gather_neighbors(tx, idx), axis=2)  # [B, N, out]
    return self.norm(jax.nn.leaky_relu(center + nbr_max, 0.2))


class PooledOutput(nnx.Module):
  """Per-element linear to pool_dim, max- and mean-pool over elements, linear to embed_dim.

  DGCNN concatenates max and average pooling; projecting to embed_dim after pooling keeps
  the per-element width (the dominant CPU cost) at pool_dim.
  """

  def __init__(self, in_dim: int, pool_dim: int, embed_dim: int, *, rngs: nnx.Rngs):
    self.pre = nnx.Linear(in_dim, pool_dim, rngs=rngs)
    self.post = nnx.Linear(2 * pool_dim, embed_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, N, in] -> [B, embed]."""
    h = jax.nn.leaky_relu(self.pre(x), 0.2)  # [B, N, pool]
    return self.post(jnp.concatenate([jnp.max(h, axis=1), jnp.mean(h, axis=1)], axis=-1))


class PointEncoder(nnx.Module):
  """DGCNN-like: edge convs on a dynamic kNN graph, concat, pooled over points."""

  def __init__(self, channels: Sequence[int], k: int, pool_dim: int, embed_dim: int, *,
               dynamic_graph: bool = True, rngs: nnx.Rngs):
    self.k, self.dynamic_graph = k, dynamic_graph
    dims = (3, *channels)
    self.convs = nnx.List([EdgeConv(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.out = PooledOutput(sum(channels), pool_dim, embed_dim, rngs=rngs)

  def __call__(self, points: jax.Array) -> jax.Array:
    """points [B, N, 3] -> [B, embed]; invariant to the order of the points."""
    h, layers = points, []
    idx = knn(points, self.k)  # [B, N, k]
    for i, conv in enumerate(self.convs):
      if self.dynamic_graph and i:  # DGCNN rebuilds the graph in each layer's feature space.
        idx = knn(h, self.k)
      h = conv(h, idx)
      layers.append(h)
    return self.out(jnp.concatenate(layers, axis=-1))


class ViewEncoder(nnx.Module):
  """MVCNN-like: a shared stride-2 CNN per view, linear, max over views, linear."""

  def __init__(self, channels: Sequence[int], view_size: int, pool_dim: int, embed_dim: int,
               *, rngs: nnx.Rngs):
    dims = (1, *channels)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)
                           for a, b in zip(dims[:-1], dims[1:])])
    side = view_size
    for _ in channels:
      side = -(-side // 2)  # SAME padding, stride 2.
    self.per_view = nnx.Linear(side * side * channels[-1], pool_dim, rngs=rngs)
    self.out = nnx.Linear(pool_dim, embed_dim, rngs=rngs)

  def __call__(self, views: jax.Array) -> jax.Array:
    """views [B, V, H, W] uint8 -> [B, embed]."""
    b, v, hgt, wid = views.shape
    h = views.reshape(b * v, hgt, wid, 1).astype(jnp.float32) / 127.5 - 1.0  # [BV, H, W, 1]
    for conv in self.convs:
      h = jax.nn.relu(conv(h))
    h = jax.nn.relu(self.per_view(h.reshape(b * v, -1)))  # [BV, pool]
    return self.out(jnp.max(h.reshape(b, v, -1), axis=1))  # View pooling (MVCNN).


class MeshEncoder(nnx.Module):
  """MeshNet-like: spatial + structural face descriptors, mesh convs, pooled over faces."""

  def __init__(self, width: int, conv_layers: int, pool_dim: int, embed_dim: int, *,
               rngs: nnx.Rngs):
    self.spatial = nnx.Sequential(nnx.Linear(3, width, rngs=rngs), jax.nn.relu,
                                  nnx.Linear(width, width, rngs=rngs), jax.nn.relu)
    self.rotate = nnx.Linear(6, width, rngs=rngs)  # Face rotate conv on corner pairs.
    self.structural = nnx.Linear(width + 3, width, rngs=rngs)  # + the face normal.
    self.self_w = nnx.List([nnx.Linear(2 * width, 2 * width, rngs=rngs)
                            for _ in range(conv_layers)])
    self.nbr_w = nnx.List([nnx.Linear(2 * width, 2 * width, use_bias=False, rngs=rngs)
                           for _ in range(conv_layers)])
    self.out = PooledOutput(2 * width * (conv_layers + 1), pool_dim, embed_dim, rngs=rngs)

  def __call__(self, centers: jax.Array, normals: jax.Array, corners: jax.Array,
               neighbors: jax.Array) -> jax.Array:
    """centers/normals [B, F, 3], corners [B, F, 9], neighbors [B, F, 3] int -> [B, embed]."""
    spatial = self.spatial(centers)  # [B, F, width]
    c = corners.reshape(*corners.shape[:-1], 3, 3)  # [B, F, corner, xyz]
    pairs = jnp.concatenate([c, jnp.roll(c, -1, axis=-2)], axis=-1)  # [B, F, 3, 6]
    # Average over the three rotations: invariant to which corner is listed first.
    rot = jnp.mean(jax.nn.relu(self.rotate(pairs)), axis=-2)  # [B, F, width]
    structural = jax.nn.relu(self.structural(jnp.concatenate([rot, normals], axis=-1)))
    h = jnp.concatenate([spatial, structural], axis=-1)  # [B, F, 2 width]
    layers = [h]
    for self_w, nbr_w in zip(self.self_w, self.nbr_w):
      nbr = jnp.max(gather_neighbors(h, neighbors), axis=2)  # [B, F, 2 width]
      h = jax.nn.relu(self_w(h) + nbr_w(nbr))
      layers.append(h)
    return self.out(jnp.concatenate(layers, axis=-1))
