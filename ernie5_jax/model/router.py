"""The modality-agnostic MoE router, its balancing bias and its auxiliary statistics.

Routing follows DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2) as adopted by ERNIE 5.0:
experts are *selected* on score + bias, where the bias is a non-trainable per-expert
offset moved by `update_router_bias` (aux-loss-free balancing), and the *combine
weights* are the selected scores without the bias, renormalised over the top-k.
The router sees only the hidden state, never the token's modality.

Elastic width (ernie5_jax/model/elastic.py): an `expert_mask` gives the experts outside
it -inf logits, so their scores are 0, they are never selected and the statistics
(load-balance loss, entropy) count only the active experts. As in ERNIE 5.0's elastic MoE
layer, the bias enters the selection only at full width and full top-k: a reduced pass
selects on the scores alone (and train/step.py moves the bias on full-routing passes only).

Routing replay (rollout router replay, RL post-training; issue 8, after "R3", arXiv
2510.11370): `route(..., replay_ids=)` uses given expert ids instead of its own top-k,
and recomputes the combine weights from the live scores gathered at those ids, normalised
exactly as for its own choice, so the router keeps its gradient. A token whose replay row
holds a negative id (not recorded: a layer an elastic sub-model skipped, slots beyond a
smaller top-k) is routed live.
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


def load_balance_loss(probs: jax.Array, load: jax.Array, top_k: int,
                      num_experts: jax.Array | int | None = None) -> jax.Array:
  """Switch load-balance loss E * sum_e f_e * P_e (Fedus et al. 2021, arXiv 2101.03961, eq. 4).

  Args:
    probs: [tokens, experts] routing distribution; P_e is its mean over tokens.
    load: [experts] assignment counts; f_e = load_e / (tokens * top_k).
    top_k: experts per token.
    num_experts: E, the experts that can be routed to (default probs.shape[-1]; fewer
      under an elastic expert mask), so that a uniform load gives 1.
  """
  num_tokens = probs.shape[0]
  num_experts = probs.shape[-1] if num_experts is None else num_experts
  fraction = load / (num_tokens * top_k)  # [experts]
  return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean_t logsumexp(logits_t)^2 (Zoph et al. 2022, arXiv 2202.08906)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def token_entropy(probs: jax.Array, num_experts: jax.Array | int | None = None) -> jax.Array:
  """Each token's routing entropy normalised by log(experts), in [0, 1]: [tokens, E] -> [tokens].

  num_experts: the experts that can be routed to (default probs.shape[-1]); 0 if it is 1.
  """
  num_experts = probs.shape[-1] if num_experts is None else num_experts
  entropy = jnp.sum(jax.scipy.special.entr(probs), axis=-1)  # [tokens]
  log_e = jnp.log(jnp.asarray(num_experts, jnp.float32))
  return jnp.where(log_e > 0, entropy / jnp.where(log_e > 0, log_e, 1.0), 0.0)


def router_entropy(probs: jax.Array, num_experts: jax.Array | int | None = None) -> jax.Array:
  """Mean over tokens of token_entropy: the layer's normalised routing entropy, in [0, 1]."""
  return jnp.mean(token_entropy(probs, num_experts))


def load_deviation(load: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """mean(load) - load over the active experts, 0 for the others: [..., experts] -> same.

  active: optional bool [..., experts] (an elastic expert mask, False for the experts of a
  skipped layer); the mean is over the active experts of each row.
  """
  if active is None:
    return jnp.mean(load, axis=-1, keepdims=True) - load
  active = active.astype(load.dtype)
  mean_load = jnp.sum(load * active, axis=-1, keepdims=True) / jnp.maximum(
      jnp.sum(active, axis=-1, keepdims=True), 1.0)
  return (mean_load - load) * active


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float,
                       active: jax.Array | None = None) -> jax.Array:
  """Aux-loss-free balancing step: bias += rate * sign(mean(load) - load), per layer.

  Underloaded experts get a larger bias, overloaded ones a smaller one; experts at the
  mean load are unchanged (sign(0) = 0). bias and load: [..., experts]; the load is
  summed over the global batch by the caller.

  Elastic training: with `active` (bool, load's shape) the mean is over the active
  experts and inactive ones do not move. load and active may carry one more leading axis
  than bias (micro-batches, each with its own sub-model): the signal is then
  sign(sum_m (mean_active_m(load_m) - load_m)), each micro-batch measured against the
  experts it could route to, so a sub-model's narrower expert set does not read as an
  overload of the experts it keeps.
  """
  deviation = load_deviation(load, active)
  if deviation.ndim == bias.ndim + 1:
    deviation = jnp.sum(deviation, axis=0)
  return (bias + rate * jnp.sign(deviation)).astype(bias.dtype)


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
  token_entropy: jax.Array  # [tokens] float32, no gradient (routing analysis)

  def stats(self) -> dict[str, jax.Array]:
    """Returns the statistics as the decoder's per-layer aux dict."""
    return {"expert_load": self.expert_load, "router_entropy": self.router_entropy,
            "load_balance_loss": self.load_balance_loss, "z_loss": self.z_loss,
            "token_entropy": self.token_entropy}


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

  def __call__(self, x: jax.Array, *, expert_mask: jax.Array | None = None,
               top_k: int | None = None) -> Routing:
    """Routes x [tokens, embed] to top_k (default self.top_k) of the experts in expert_mask."""
    return self.route(self.logits(x, expert_mask), self.top_k if top_k is None else top_k,
                      expert_mask)

  def logits(self, x: jax.Array, expert_mask: jax.Array | None = None) -> jax.Array:
    """Router logits [tokens, experts] float32 of x [tokens, embed]; -inf outside expert_mask."""
    logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32),
                        self.kernel[...].astype(jnp.float32))  # [tokens, experts]
    if expert_mask is not None:  # [experts] bool
      logits = jnp.where(expert_mask, logits, -jnp.inf)
    return logits

  def route(self, logits: jax.Array, top_k: int, expert_mask: jax.Array | None = None,
            replay_ids: jax.Array | None = None) -> Routing:
    """Top-k selection on score + bias from logits [tokens, experts] (static top_k).

    replay_ids: optional [tokens, top_k] int32 ids to use instead (module docstring); rows
    with a negative id keep the live choice. The combine weights are the live scores at
    the ids used, renormalised over the top-k, either way.
    """
    scores = router_scores(logits, self.score)
    bias = jax.lax.stop_gradient(self.bias[...])  # [experts]
    num_experts = None
    if expert_mask is not None or top_k != self.top_k:  # Bias at full routing only.
      full = top_k == self.top_k
      if expert_mask is not None:
        full = jnp.logical_and(full, jnp.all(expert_mask))
      bias = jnp.where(full, bias, 0.0)
    key = scores + bias
    if expert_mask is not None:  # Masked experts are never selected.
      key = jnp.where(expert_mask, key, -jnp.inf)
      num_experts = jnp.sum(expert_mask)
    _, expert_ids = jax.lax.top_k(key, top_k)  # [tokens, top_k]
    if replay_ids is not None:
      if replay_ids.shape != expert_ids.shape:
        raise ValueError(f"replay_ids.shape={replay_ids.shape} is not accepted: expected "
                         f"{expert_ids.shape} (tokens, top_k)")
      recorded = jnp.all(replay_ids >= 0, axis=-1, keepdims=True)  # [tokens, 1]
      expert_ids = jnp.where(recorded, replay_ids.astype(expert_ids.dtype), expert_ids)
    selected = jnp.take_along_axis(scores, expert_ids, axis=-1)  # [tokens, top_k]
    total = jnp.sum(selected, axis=-1, keepdims=True)
    if replay_ids is not None:  # Replayed ids outside an expert mask can sum to 0: no NaN.
      total = jnp.where(total > 0, total, 1.0)
    weights = selected / total  # [tokens, top_k]
    probs = routing_probs(scores, self.score)
    load = expert_load(expert_ids, scores.shape[-1])
    per_token = token_entropy(jax.lax.stop_gradient(probs), num_experts)  # [tokens]
    return Routing(
        expert_ids=expert_ids.astype(jnp.int32),
        combine_weights=weights,
        expert_load=load,
        router_entropy=jnp.mean(per_token),
        token_entropy=per_token,
        load_balance_loss=load_balance_loss(probs, load, top_k, num_experts),
        z_loss=router_z_loss(logits),
    )
