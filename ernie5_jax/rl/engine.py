"""The RL engine of one run: its compiled pieces and the iteration's update batch.

The RL loop (rl/train.py) makes one `Engine` per run, and what it compiles lives as long as
the run (nothing is cached at module level):
- the rollout side: a rollout_lib.DecoderCache, so that every rollout of the run (training
  rollouts at rl.rollout_dtype, held-out evaluation) reuses one set of compiled decode steps;
- the training side (float32): `forward` (log p(targets) and the token entropy, routed with
  the rollout's expert ids or live), `policy_loss` (config.rl.loss) and `update_step` (one
  AdamW step), jitted for the run's graph and optimizer.
`Engine.prepare` turns an iteration's scored rollouts of every family into one `Batch` of a
fixed padded shape (pi_old, MISC, WPSM, group advantages), so the update compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ernie5_jax.generate.sampling import Sampling
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.rl import objective as obj
from ernie5_jax.rl import rollout as rollout_lib
from ernie5_jax.train.state import TrainState


# --- the training engine's functions (jitted per run by Engine) ------------------------------
def forward(params, rest, fields: dict[str, jax.Array], replay_ids: jax.Array | None, *,
            graphdef: nnx.GraphDef, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """log p(targets) [N, S] and token entropy [N, S] of the training engine's policy.

  fields: Rollouts.fields() [N, S, ...]; replay_ids [L_moe, N, S, K] routes as the rollout
  did, None routes live. The policy is rollout.policy_log_probs: the id range the sampler
  drew from at the rollout temperature, the distribution infer_logprobs is taken under.
  """
  model = nnx.merge(graphdef, params, rest)
  logits, _ = model(fields["tokens"], fields["positions"], fields["segment_ids"],
                    fields["group_ids"], fields["audio_codes"], routing_replay=replay_ids)
  logp_all = rollout_lib.policy_log_probs(logits, fields, temperature)  # [N, S, V]
  logp = jnp.take_along_axis(logp_all, fields["targets"][..., None], axis=-1)[..., 0]
  terms = jnp.where(jnp.isfinite(logp_all), jnp.exp(logp_all) * logp_all, 0.0)
  return logp, -jnp.sum(terms, axis=-1)


def policy_loss(params, rest, fields, replay_ids, batch: dict[str, jax.Array], *,
                graphdef: nnx.GraphDef, rl: ml_collections.ConfigDict):
  """The policy loss of the rollouts (config.rl.loss) and its metrics.

  batch: logp_old [N, S], mask [N, S] (the tokens the loss reads), advantages [N],
  weights [N].
  """
  logp, _ = forward(params, rest, fields, replay_ids, graphdef=graphdef,
                    temperature=rl.temperature)
  if rl.loss == "gspo":
    return obj.gspo_loss(logp, batch["logp_old"], batch["mask"], batch["advantages"],
                         clip_low=rl.clip_low, clip_high=rl.clip_high, weights=batch["weights"])
  return obj.token_clip_loss(logp, batch["logp_old"], batch["mask"], batch["advantages"],
                             clip_low=rl.token_clip_low, clip_high=rl.token_clip_high,
                             weights=batch["weights"])


def update_step(state: TrainState, fields, replay_ids, batch: dict[str, jax.Array], *,
                graphdef: nnx.GraphDef, rl: ml_collections.ConfigDict,
                tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on the policy loss; returns (state, metrics as train/metrics.py reads them).

  The router bias (state.rest) stays frozen: no load-balancing updates in post-training.
  """
  def loss_fn(params):
    return policy_loss(params, state.rest, fields, replay_ids, batch, graphdef=graphdef, rl=rl)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
         "clip_fraction": metrics["clip_fraction"],
         # 1.0 iff every new parameter is finite (a finite loss can still lead to inf params).
         "params_finite": jnp.all(jnp.stack(
             [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])).astype(jnp.float32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


# --- the update batch -------------------------------------------------------------------------
# Right-padding values of the sequence fields (others 0); padding samples from every id.
_PAD = {"audio_codes": -1, "sample_hi": np.iinfo(np.int32).max}


def concat_rollouts(rollouts: list[rollout_lib.Rollouts], width: int
                    ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
  """Rows of several families right-padded to `width` positions and stacked.

  Returns (fields [N, width, ...] as logprobs_fn reads them, response_mask [N, width],
  infer_logprobs [N, width], expert_ids [L_moe, N, width, K]; padding: segment 0, mask 0,
  expert id -1). One shape for every family: the training engine compiles once.
  """
  def pad(x: np.ndarray, axis: int, value) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, width - x.shape[axis])
    return np.pad(x, widths, constant_values=value)
  fields = {k: jnp.asarray(np.concatenate([pad(ro.fields()[k], 1, _PAD.get(k, 0))
                                           for ro in rollouts]))
            for k in rollouts[0].fields()}
  mask = np.concatenate([pad(ro.response_mask, 1, 0) for ro in rollouts])
  infer = np.concatenate([pad(ro.infer_logprobs, 1, 0) for ro in rollouts])
  expert_ids = np.concatenate([pad(ro.expert_ids, 2, -1) for ro in rollouts], axis=1)
  return fields, jnp.asarray(mask), jnp.asarray(infer), jnp.asarray(expert_ids, jnp.int32)


def filled_rewards(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Dropped (NaN) rewards [N] replaced by their group's mean of valid ones (advantage 0)."""
  r = rewards.reshape(-1, group_size)
  valid = np.isfinite(r)
  mean = np.where(valid.any(-1), np.nansum(np.where(valid, r, 0), -1) / np.maximum(
      valid.sum(-1), 1), 0.0)
  return np.where(valid, r, mean[:, None]).reshape(-1).astype(np.float32)


@dataclasses.dataclass
class Batch:
  """An iteration's rows of every family in one padded shape [N, S], and their diagnostics."""
  fields: dict[str, jax.Array]  # [N, S, ...] model inputs + targets (Rollouts.fields()).
  replay: jax.Array | None  # [L_moe, N, S, K] the rollout's expert ids if rl.router_replay.
  mask: jax.Array  # [N, S] response tokens of the scored, released rows.
  keep: jax.Array  # [N, S] mask after MISC: the tokens the loss reads.
  infer: jax.Array  # [N, S] the rollout engine's log-probs.
  logp_old: jax.Array  # [N, S] the training engine's log pi_old (routed as `replay`).
  logp_other: jax.Array  # [N, S] the same with the other routing choice (diagnostics).
  entropy: jax.Array  # [N, S] token entropy of the training engine.
  rewards: jax.Array  # [N] dropped ones filled with their group's mean.
  advantages: jax.Array  # [N] group-normalised.
  weights: jax.Array  # [N] WPSM weights (1: not down-weighted).
  router_replay: bool

  def loss_inputs(self) -> dict[str, jax.Array]:
    """What policy_loss reads."""
    return {"logp_old": self.logp_old, "mask": self.keep, "advantages": self.advantages,
            "weights": self.weights}

  def diagnostics(self, rows: slice = slice(None)) -> dict[str, float]:
    """Entropy, mismatch KL (both routings), MISC-masked and WPSM shares of `rows`."""
    m = self.mask[rows]
    other = "live" if self.router_replay else "replay"
    return {
        "entropy": float(jnp.sum(self.entropy[rows] * m) / jnp.maximum(m.sum(), 1)),
        "mismatch_kl": float(obj.mismatch_kl(self.logp_old[rows], self.infer[rows], m)),
        f"mismatch_kl_{other}": float(obj.mismatch_kl(self.logp_other[rows], self.infer[rows],
                                                      m)),
        "misc_masked": float(obj.masked_fraction(m, self.keep[rows])),
        "wpsm_down_weighted": float(jnp.mean(self.weights[rows] < 1)),
    }


# --- the engine ------------------------------------------------------------------------------
class Engine:
  """One RL run's compiled pieces: rollout decoders, the training forward and update step."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, layout: seq_lib.VocabularyLayout):
    rl = config.rl
    self.rl, self.graphdef, self.layout = rl, graphdef, layout
    self.sampling = Sampling(temperature=rl.temperature, top_p=rl.top_p)
    self.rollout_dtype = None if rl.rollout_dtype == "float32" else jnp.dtype(rl.rollout_dtype)
    self.decoders = rollout_lib.DecoderCache()
    self.forward = jax.jit(functools.partial(forward, graphdef=graphdef,
                                             temperature=rl.temperature))
    self.update_step = jax.jit(functools.partial(update_step, graphdef=graphdef, rl=rl, tx=tx),
                               donate_argnames=("state",))
    self.width = 0  # The widest padded row so far: the update batch's width only grows.

  def model(self, state: TrainState) -> nnx.Module:
    """The policy of state, as a module."""
    return nnx.merge(self.graphdef, state.params, state.rest)

  def rollout(self, model: nnx.Module, prompts, *, group_size: int, rng: jax.Array,
              dtype=None) -> rollout_lib.Rollouts:
    """rollout_lib.rollout at the run's sampling and layout, on its cached decoders."""
    return rollout_lib.rollout(model, prompts, group_size=group_size,
                               max_new_tokens=self.rl.max_new_tokens, sampling=self.sampling,
                               rng=rng, dtype=dtype, layout=self.layout,
                               decoders=self.decoders)

  def prepare(self, state: TrainState, rollouts: list[rollout_lib.Rollouts],
              rewards: list[np.ndarray], keep_rows: list[np.ndarray]) -> Batch:
    """The update Batch of the families' rollouts; rewards [N_f] (NaN: dropped) per family.

    keep_rows [N_f] bool per family: rows that were scored and released by the buffer
    (others are padding to the loss). log pi_old is the training engine's (float32) with
    the rollout's routing replayed (rl.router_replay) or live.
    """
    rl, g = self.rl, self.rl.group_size
    self.width = max(max(ro.tokens.shape[1] for ro in rollouts), self.width)
    fields, mask, infer, expert_ids = concat_rollouts(rollouts, self.width)
    mask = mask * jnp.asarray(np.concatenate(keep_rows), jnp.float32)[:, None]
    filled = jnp.asarray(np.concatenate([filled_rewards(r, g) for r in rewards]))
    replay = expert_ids if rl.router_replay else None
    logp_old, entropy = self.forward(state.params, state.rest, fields, replay)
    logp_other, _ = self.forward(state.params, state.rest, fields,
                                 None if rl.router_replay else expert_ids)
    keep = (obj.misc_mask(logp_old, infer, mask, alpha=rl.misc_alpha, beta=rl.misc_beta)
            if rl.misc else mask)
    seq_entropy = obj.masked_sequence_mean(entropy, mask)  # [N]
    weights = (obj.wpsm_weights(filled, g, seq_entropy, solved_threshold=rl.wpsm_tau,
                                entropy_threshold=rl.wpsm_eta, down_weight=rl.wpsm_a)
               if rl.wpsm else jnp.ones(filled.shape, jnp.float32))
    return Batch(fields=fields, replay=replay, mask=mask, keep=keep, infer=infer,
                 logp_old=logp_old, logp_other=logp_other, entropy=entropy, rewards=filled,
                 advantages=obj.group_advantages(filled, g), weights=weights,
                 router_replay=rl.router_replay)

  def update(self, state: TrainState, batch: Batch
             ) -> tuple[TrainState, list[dict[str, jax.Array]]]:
    """rl.updates optimizer steps on batch; returns (state, each step's device metrics)."""
    steps = []
    for _ in range(self.rl.updates):
      state, metrics = self.update_step(state, batch.fields, batch.replay, batch.loss_inputs())
      steps.append(metrics)
    return state, steps
