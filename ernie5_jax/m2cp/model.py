"""The M2CP model: three encoders, a shared classifier and projection head, a fused classifier.

Heads as in M2CP (Chen et al., BMVC 2021, Sec. 3): the classifier and the projection
head are shared by the three modalities' embed_dim features; the fused classifier
reads their concatenation. The per-class prototypes of the M2CP loss live here as a
non-trainable variable (see losses.update_prototypes for how they are maintained), and
so does the moving average of the unlabelled predictions (distribution alignment and the
class-balance loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ernie5_jax.m2cp import encoders

MODALITIES = ("point", "view", "mesh")


class Prototypes(nnx.Variable):
  """Unit-norm per-class prototypes [num_classes, embed]; EMA-updated, no gradient."""


class PredictionMean(nnx.Variable):
  """Moving average [num_classes] of the pseudo-labelling prediction on unlabelled rows."""


class M2CPModel(nnx.Module):
  """Encoders + shared classifier / projection head + fused classifier + prototypes."""

  def __init__(self, cfg: ml_collections.ConfigDict, view_size: int, *, rngs: nnx.Rngs):
    e, p = cfg.embed_dim, cfg.pool_dim
    self.point = encoders.PointEncoder(cfg.point_channels, cfg.knn, p, e,
                                       dynamic_graph=cfg.dynamic_graph, rngs=rngs)
    self.view = encoders.ViewEncoder(cfg.view_channels, view_size, p, e, rngs=rngs)
    self.mesh = encoders.MeshEncoder(cfg.mesh_channels, cfg.mesh_conv_layers, p, e, rngs=rngs)
    self.classifier = nnx.Linear(e, cfg.num_classes, rngs=rngs)
    self.projector = nnx.Sequential(nnx.Linear(e, e, rngs=rngs), jax.nn.relu,
                                    nnx.Linear(e, cfg.proj_dim, rngs=rngs))
    self.fused = nnx.Linear(len(MODALITIES) * e, cfg.num_classes, rngs=rngs)
    init = jax.random.normal(rngs.params(), (cfg.num_classes, e))
    self.prototypes = Prototypes(init / jnp.linalg.norm(init, axis=-1, keepdims=True))
    # For losses.align_distribution and losses.class_balance; starts uniform.
    self.prediction_mean = PredictionMean(jnp.full((cfg.num_classes,), 1 / cfg.num_classes))

  def features(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-modality features: {"point", "view", "mesh"} each [B, embed]."""
    return {"point": self.point(batch["points"]), "view": self.view(batch["views"]),
            "mesh": self.mesh(batch["centers"], batch["normals"], batch["corners"],
                              batch["neighbors"])}

  def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Features, per-modality logits, fused logits and projections of a batch."""
    feats = self.features(batch)
    out = {f"feat/{m}": f for m, f in feats.items()}
    out.update({f"logits/{m}": self.classifier(f) for m, f in feats.items()})
    out.update({f"proj/{m}": self.projector(f) for m, f in feats.items()})
    out["logits/fused"] = self.fused(jnp.concatenate([feats[m] for m in MODALITIES], -1))
    return out
