"""The modality-agnostic MoE router, its balancing bias and its auxiliary statistics.

Routing follows DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2) as adopted by ERNIE 5.0:
experts are *selected* on score + bias, where the bias is a non-trainable per-expert
offset moved by `update_router_bias` (aux-loss-free balancing), and the *combine
weights* are the selected scores without the bias, renormalised over the top-k.
The router sees only the hidden state, never the token's modality.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ernie5_jax.config import ROUTER_SCORES
from ernie5_jax.model.layers import fan_in_init, param


class RouterBias(nnx.Variable):
  """Non-trainable per-expert selection bias, [experts] ([layers, experts] when stacked)."""


def router_scores(logits: jax.Array, score: str) -> jax.Array:
  """Maps router logits [tokens, experts] to scores: softmax or elementwise sigmoid."""
  if score == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"router_score={score!r} is not accepted: expected one of {ROUTER_SCORES}")


def routing_probs(scores: jax.Array, score: str) -> jax.Array:
  """Scores as a distribution over experts (sigmoid scores are normalised to sum 1)."""
  if score == "sigmoid":
    return scores / jnp.sum(scores, axis=-1, keepdims=True)
  return scores


def expert_load(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Counts (token, slot) assignments per expert: [tokens, top_k] -> [experts] float32."""
  return jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=(0, 1))


def load_balance_loss(probs: jax.Array, load: jax.Array, top_k: int) -> jax.Array:
  """Switch load-balance loss E * sum_e f_e * P_e (Fedus et al. 2021, arXiv 2101.03961, eq. 4).

  Args:
    probs: [tokens, experts] routing distribution; P_e is its mean over tokens.
    load: [experts] assignment counts; f_e = load_e / (tokens * top_k).
    top_k: experts per token.
  """
  num_tokens, num_experts = probs.shape
  fraction = load / (num_tokens * top_k)  # [experts]
  return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean_t logsumexp(logits_t)^2 (Zoph et al. 2022, arXiv 2202.08906)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean over tokens of the routing entropy normalised by log(experts), in [0, 1]."""
  num_experts = probs.shape[-1]
  entropy = jnp.sum(jax.scipy.special.entr(probs), axis=-1)  # [tokens]
  return jnp.mean(entropy) / jnp.log(num_experts)


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step: bias += rate * sign(mean(load) - load), per layer.

  Underloaded experts get a larger bias, overloaded ones a smaller one; experts at the
  mean load are unchanged (sign(0) = 0). bias and load: [..., experts]; the load is
  summed over the global batch by the caller.
  """
  mean_load = jnp.mean(load, axis=-1, keepdims=True)
  return (bias + rate * jnp.sign(mean_load - load)).astype(bias.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Router output: which experts each token uses, with what weights, plus statistics."""
  expert_ids: jax.Array  # [tokens, top_k] int32
  combine_weights: jax.Array  # [tokens, top_k] float32
  expert_load: jax.Array  # [experts] float32
  router_entropy: jax.Array  # [] float32
  load_balance_loss: jax.Array  # [] float32
  z_loss: jax.Array  # [] float32

  def stats(self) -> dict[str, jax.Array]:
    """Returns the statistics as the decoder's per-layer aux dict."""
    return {"expert_load": self.expert_load, "router_entropy": self.router_entropy,
            "load_balance_loss": self.load_balance_loss, "z_loss": self.z_loss}


class Router(nnx.Module):
  """Linear router (logits in float32) with top-k selection on score + RouterBias."""

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, score: str,
               param_dtype, rngs: nnx.Rngs):
    if score not in ROUTER_SCORES:
      raise ValueError(f"router_score={score!r} is not accepted: expected one of "
                       f"{ROUTER_SCORES}")
    if not 0 < top_k <= num_experts:
      raise ValueError(f"top_k={top_k} is not accepted: expected 1..num_experts={num_experts}")
    self.kernel = param(rngs, fan_in_init(0, 1), (d_model, num_experts), ("embed", "expert"),
                        param_dtype)
    self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), out_sharding=("expert",),
                           eager_sharding=False)
    self.top_k = top_k
    self.score = score

  def __call__(self, x: jax.Array) -> Routing:
    """Routes x [tokens, embed] to top_k experts per token."""
    logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32),
                        self.kernel[...].astype(jnp.float32))  # [tokens, experts]
    scores = router_scores(logits, self.score)
    bias = jax.lax.stop_gradient(self.bias[...])
    _, expert_ids = jax.lax.top_k(scores + bias, self.top_k)  # [tokens, top_k]
    selected = jnp.take_along_axis(scores, expert_ids, axis=-1)
    weights = selected / jnp.sum(selected, axis=-1, keepdims=True)  # [tokens, top_k]
    probs = routing_probs(scores, self.score)
    load = expert_load(expert_ids, scores.shape[-1])
    return Routing(
        expert_ids=expert_ids.astype(jnp.int32),
        combine_weights=weights,
        expert_load=load,
        router_entropy=router_entropy(jax.lax.stop_gradient(probs)),
        load_balance_loss=load_balance_loss(probs, load, self.top_k),
        z_loss=router_z_loss(logits),
    )
