"""Mixture-of-Experts FFN: router + fine-grained SwiGLU experts + optional shared experts.

Fine-grained routed experts and always-on shared experts follow DeepSeekMoE
(arXiv 2401.06066) as used by ERNIE 5.0. The routed experts' weights are stacked
[experts, ...] and run by `ernie5_jax.ops.moe_dispatch.expert_ffn`, which picks the
dispatch backend (dropless gather / ragged_dot / capacity) in one place.

Elastic sub-models (ernie5_jax/model/elastic.py): with an expert mask and a top-k index,
the router logits are computed once, then `lax.switch` picks one branch per allowed top-k
(static k each: routing + dispatch of tokens * k assignments), so a smaller k really runs
fewer expert rows, and every k shares one compiled program. The masked experts' weights
stay in the dispatch layout (their rows are empty); an exported sub-model drops them.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ernie5_jax.model.layers import MLP, fan_in_init, param
from ernie5_jax.model.router import Router
from ernie5_jax.ops.moe_dispatch import expert_ffn


class Experts(nnx.Module):
  """E fine-grained SwiGLU experts with stacked weights [experts, ...]."""

  def __init__(self, d_model: int, hidden: int, num_experts: int, *, param_dtype,
               rngs: nnx.Rngs):
    init_in = fan_in_init(1, 2, batch_axis=0)
    self.w_gate = param(rngs, init_in, (num_experts, d_model, hidden),
                        ("expert", "embed", "expert_mlp"), param_dtype)
    self.w_up = param(rngs, init_in, (num_experts, d_model, hidden),
                      ("expert", "embed", "expert_mlp"), param_dtype)
    self.w_down = param(rngs, init_in, (num_experts, hidden, d_model),
                        ("expert", "expert_mlp", "embed"), param_dtype)


class MoE(nnx.Module):
  """Routed experts (+ shared experts) applied to every token of [batch, seq, embed]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.router = Router(cfg.d_model, cfg.num_experts, cfg.top_k, score=cfg.router_score,
                         param_dtype=param_dtype, rngs=rngs)
    self.experts = Experts(cfg.d_model, cfg.expert_hidden, cfg.num_experts,
                           param_dtype=param_dtype, rngs=rngs)
    # num_shared experts of width expert_hidden, always on, are one dense SwiGLU of
    # width num_shared * expert_hidden (the sum of their outputs).
    self.shared = (MLP(cfg.d_model, cfg.num_shared_experts * cfg.expert_hidden, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
                   if cfg.num_shared_experts else None)
    self.dtype = dtype
    self.backend = cfg.moe_dispatch
    self.capacity_factor = cfg.capacity_factor

  def __call__(self, x: jax.Array, *, expert_mask: jax.Array | None = None,
               top_k_index: jax.Array | None = None, top_ks: tuple[int, ...] = ()
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [batch, seq, embed] -> (y [batch, seq, embed], per-layer router statistics).

    Elastic (all optional): expert_mask [experts] bool; top_k_index [] int32 picks the top-k
    from the static ascending tuple top_ks (default: the router's top_k).
    """
    batch, seq, d_model = x.shape
    x = x.astype(self.dtype)
    x_flat = x.reshape(batch * seq, d_model)  # [tokens, embed]
    w = lambda p: p[...].astype(self.dtype)

    def routed(logits: jax.Array, top_k: int) -> tuple[jax.Array, dict[str, jax.Array]]:
      routing = self.router.route(logits, top_k, expert_mask)
      y = expert_ffn(x_flat, routing.expert_ids, routing.combine_weights.astype(self.dtype),
                     w(self.experts.w_gate), w(self.experts.w_up), w(self.experts.w_down),
                     backend=self.backend, capacity_factor=self.capacity_factor)
      return y, routing.stats()  # [tokens, embed]

    logits = self.router.logits(x_flat, expert_mask)  # [tokens, experts]
    if top_k_index is None or len(top_ks) <= 1:
      y, stats = routed(logits, top_ks[0] if top_ks else self.router.top_k)
    else:
      branches = [lambda lg, k=k: routed(lg, k) for k in top_ks]
      y, stats = jax.lax.switch(top_k_index, branches, logits)  # clamps the index
    y = y.reshape(batch, seq, d_model)  # [batch, seq, embed]
    if self.shared is not None:
      y = y + self.shared(x)
    return y.astype(self.dtype), stats
