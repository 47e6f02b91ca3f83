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

Routing record / replay (RL, model/router.py): the per-layer statistics carry
"expert_ids" [batch, seq, model top_k] int32, the ids used; a smaller elastic top-k k
fills slots k.. with -1. `replay_ids` of that layout routes with the given ids (branch k
of the elastic switch reads slots ..k; a row with a negative id there is routed live).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ernie5_jax.model.layers import MLP, fan_in_init, param, to_dtype
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
    router_dtype = cfg.get("router_param_dtype") or None
    self.router = Router(cfg.d_model, cfg.num_experts, cfg.top_k, score=cfg.router_score,
                         param_dtype=to_dtype(router_dtype) if router_dtype else param_dtype,
                         rngs=rngs)
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
               top_k_index: jax.Array | None = None, top_ks: tuple[int, ...] = (),
               replay_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [batch, seq, embed] -> (y [batch, seq, embed], per-layer router statistics).

    Elastic (all optional): expert_mask [experts] bool; top_k_index [] int32 picks the top-k
    from the static ascending tuple top_ks (default: the router's top_k).
    replay_ids: optional [batch, seq, router top_k] int32 expert ids to route with (module
    docstring); the statistics' "expert_ids" [batch, seq, router top_k] are the ids used.
    """
    batch, seq, d_model = x.shape
    full_k = self.router.top_k
    if replay_ids is not None and replay_ids.shape != (batch, seq, full_k):
      raise ValueError(f"replay_ids.shape={replay_ids.shape} is not accepted: expected "
                       f"{(batch, seq, full_k)} (batch, seq, router top_k)")
    x = x.astype(self.dtype)
    x_flat = x.reshape(batch * seq, d_model)  # [tokens, embed]
    w = lambda p: p[...].astype(self.dtype)
    replay_flat = None if replay_ids is None else replay_ids.reshape(batch * seq, full_k)

    def routed(logits: jax.Array, top_k: int) -> tuple[jax.Array, dict[str, jax.Array]]:
      replay = None if replay_flat is None else replay_flat[:, :top_k]
      routing = self.router.route(logits, top_k, expert_mask, replay)
      y = expert_ffn(x_flat, routing.expert_ids, routing.combine_weights.astype(self.dtype),
                     w(self.experts.w_gate), w(self.experts.w_up), w(self.experts.w_down),
                     backend=self.backend, capacity_factor=self.capacity_factor)
      ids = jnp.pad(routing.expert_ids, ((0, 0), (0, full_k - top_k)), constant_values=-1)
      return y, dict(routing.stats(), expert_ids=ids)  # [tokens, embed], [tokens, full_k]

    logits = self.router.logits(x_flat, expert_mask)  # [tokens, experts]
    if top_k_index is None or len(top_ks) <= 1:
      y, stats = routed(logits, top_ks[0] if top_ks else self.router.top_k)
    else:
      branches = [lambda lg, k=k: routed(lg, k) for k in top_ks]
      y, stats = jax.lax.switch(top_k_index, branches, logits)  # clamps the index
    y = y.reshape(batch, seq, d_model)  # [batch, seq, embed]
    stats["expert_ids"] = stats["expert_ids"].reshape(batch, seq, full_k)
    stats["token_entropy"] = stats["token_entropy"].reshape(batch, seq)
    if self.shared is not None:
      y = y + self.shared(x)
    return y.astype(self.dtype), stats
