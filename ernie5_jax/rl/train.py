"""The RL post-training loop: python -m ernie5_jax.main --mode=rl --config=... --workdir=...

It starts from config.train.init_from (an SFT checkpoint; see experiments/rl_digits.py) and
runs config.rl.iterations iterations. Iteration t:

1. Prompts: config.rl.prompts_per_family training prompts of every family in rl.families
   (input_pipeline/verifiable.py; indices t * P ..), optionally prefixed by an adaptive hint (rl.hints:
   p0 * exp(-gamma * t * pass_rate) of the reference answer, pass_rate of the family's last
   iteration).
2. Rollouts (rl/rollout.py): rl.group_size samples per prompt from the KV-cache generator,
   on a copy of the policy at rl.rollout_dtype (the inference engine), recording each
   token's log-prob and every MoE layer's top-k expert ids.
3. Rewards (rl/verifiers.py). A reward function that raises or returns a non-finite value
   drops that sample (no loss, zero advantage); it is counted and logged with its prompt id.
4. The unbiased replay buffer (rl/buffer.py) fixes the iteration's groups in order at its
   start; a group reaches training only when all its rollouts are complete, and only after
   every group before it. (This engine is synchronous, so all groups are released at the
   end of the rollouts; the buffer's state is checkpointed with the run either way.)
5. The training engine (float32) recomputes log pi_old(y) with the rollout's expert ids
   (rl.router_replay; live routing otherwise), and the token entropy. MISC keeps a token only
   when pi_train / pi_infer is in [misc_alpha, misc_beta]; WPSM down-weights positive rollouts
   of solved, low-entropy queries; advantages are group-normalised. rl.updates AdamW steps
   on the GSPO loss (or the token-clip baseline, rl.loss), one jitted step per family shape.
   The router bias stays frozen (no load-balancing updates in post-training).

Metrics (console + TensorBoard, like pre-training): rl/reward and rl/pass_rate per family,
entropy, clip / MISC / WPSM fractions, the training-inference mismatch KL (k3) and its
value with the other routing choice, dropped samples; heldout/reward/<family> every
rl.eval_every iterations (rl.eval_samples sampled responses per held-out prompt). Checkpoints (every
train.checkpoint_every iterations and the last) hold the model, the optimizer, and the RL
state (iteration, buffer, pass rates, dropped samples) as JSON; a resumed run draws the same
prompts and samples as an uninterrupted one (all randomness is folded from (seed, t)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from etils import epath
from flax import nnx

from ernie5_jax import input_pipeline, store
from ernie5_jax.input_pipeline import verifiable
from ernie5_jax.generate.sampling import Sampling
from ernie5_jax.rl import buffer as buffer_lib
from ernie5_jax.rl import objective as obj
from ernie5_jax.rl import rollout as rollout_lib
from ernie5_jax.rl import verifiers
from ernie5_jax.train import checkpoint, optimizer
from ernie5_jax.train import state as state_lib
from ernie5_jax.train.state import TrainState

RL_STREAM = 0x51  # Folded into key(config.seed): the rollouts' own random stream.
_PROMPT_LEN_SAMPLE = 64  # Prompts per family measured to fix the padded prompt length.


@dataclasses.dataclass
class RLState:
  """The host-side state an RL checkpoint carries next to the model and optimizer."""
  iteration: int = 0  # Iterations completed.
  pass_rate: dict[str, float] = dataclasses.field(default_factory=dict)  # Last, per family.
  dropped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # Dropped samples.
  buffer: dict[str, Any] | None = None  # ReplayBuffer.state_dict().

  def to_json(self) -> dict[str, Any]:
    """JSON-able dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> RLState:
    """Inverse of to_json."""
    return cls(**d)


# --- checkpoints (train/checkpoint.py's writer; the RL state is one more JSON item) --------
def create_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """CheckpointManager on <workdir>/checkpoints: model, optimizer, step and the RL state."""
  return checkpoint.create_manager(workdir, keep=keep, async_save=False, data=False,
                                   json_items=("rl",))


def save(manager: ocp.CheckpointManager, state: TrainState, rl_state: RLState) -> None:
  """Saves the model, optimizer and RL state as checkpoint rl_state.iteration."""
  checkpoint.save(manager, state, step=rl_state.iteration,
                  json_items={"rl": rl_state.to_json()})


def restore(manager: ocp.CheckpointManager, abstract: TrainState
            ) -> tuple[TrainState, RLState] | None:
  """The latest (state, RL state) of the manager, or None; shapes checked first."""
  state = checkpoint.restore(manager, abstract)
  if state is None:
    return None
  return state, RLState.from_json(checkpoint.restore_json(manager, "rl", manager.latest_step()))


# --- the jitted training-engine functions -----------------------------------------------------
def _forward(params, rest, fields, replay_ids, *, graphdef):
  """log p(targets) [N, S] and token entropy [N, S] of the training engine."""
  model = nnx.merge(graphdef, params, rest)
  logits, _ = model(fields["tokens"], fields["positions"], fields["segment_ids"],
                    fields["group_ids"], fields["audio_codes"], routing_replay=replay_ids)
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [N, S, V]
  logp = jnp.take_along_axis(logp_all, fields["targets"][..., None], axis=-1)[..., 0]
  entropy = -jnp.einsum("nsv,nsv->ns", jnp.exp(logp_all), logp_all)
  return logp, entropy


def _loss(params, rest, fields, replay_ids, batch, *, graphdef, rl):
  """The policy loss of one family's rollouts (config.rl.loss) and its metrics."""
  logp, _ = _forward(params, rest, fields, replay_ids, graphdef=graphdef)
  if rl.loss == "gspo":
    return obj.gspo_loss(logp, batch["logp_old"], batch["mask"], batch["advantages"],
                         clip_low=rl.clip_low, clip_high=rl.clip_high, weights=batch["weights"])
  return obj.token_clip_loss(logp, batch["logp_old"], batch["mask"], batch["advantages"],
                             clip_low=rl.token_clip_low, clip_high=rl.token_clip_high,
                             weights=batch["weights"])


def _update(state: TrainState, fields: dict, replay_ids, batch: dict, *, graphdef, rl, tx):
  """One AdamW step on the policy loss of an iteration's rollouts; returns (state, metrics)."""
  def loss_fn(params):
    return _loss(params, state.rest, fields, replay_ids, batch, graphdef=graphdef, rl=rl)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {"rl/loss": loss, "rl/grad_norm": optax.global_norm(grads),
         "rl/clip_fraction": metrics["clip_fraction"]}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


# Jitted (forward, update) per (graph, config): a resumed run in the same process reuses them.
_COMPILED: dict[Any, tuple[Any, Any]] = {}


def _compiled(config: ml_collections.ConfigDict, graphdef, tx):
  """The jitted training-engine forward and update step of (graphdef, config)."""
  key = (graphdef, config.to_json_best_effort(sort_keys=True))
  if key not in _COMPILED:
    _COMPILED[key] = (
        jax.jit(functools.partial(_forward, graphdef=graphdef)),
        jax.jit(functools.partial(_update, graphdef=graphdef, rl=config.rl, tx=tx),
                donate_argnames=("state",)))
  return _COMPILED[key]


# --- host side ------------------------------------------------------------------------------
_PAD = {"audio_codes": -1}  # Right-padding values of the sequence fields (others 0).


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


def prompt_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
  """A fixed padded prompt length per family (its longest of a sample + hint room).

  Fixed lengths keep every iteration's rollout and update shapes the same (no recompiles).
  """
  out = {}
  for family in config.rl.families:
    longest = max(verifiable.make_prompts(config, family, split=split, start=0,
                                         num=_PROMPT_LEN_SAMPLE).fields["tokens"].shape[1]
                  for split in ("train", "test"))
    out[family] = longest + (config.rl.max_new_tokens if config.rl.hints else 0) + 4
  return out


def _prompts(config, family: str, *, split: str, start: int, num: int, length: int
             ) -> verifiable.PromptBatch:
  """make_prompts at the family's fixed length (the batch's own if one prompt is longer)."""
  try:
    return verifiable.make_prompts(config, family, split=split, start=start, num=num,
                                  prompt_len=length)
  except ValueError:  # A prompt longer than the sample's: pad to it (one more compile).
    return verifiable.make_prompts(config, family, split=split, start=start, num=num)


def score(family: str, batch: verifiable.PromptBatch, ro: rollout_lib.Rollouts,
          context: verifiers.RewardContext) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Rewards [N] of the rollouts (NaN = dropped) and a record per dropped sample."""
  responses = verifiable.full_responses(batch, ro.response_tokens, rows=ro.group_index)
  rewards, dropped = np.full((len(responses),), np.nan, np.float32), []
  for n, response in enumerate(responses):
    pid = int(ro.prompt_ids[n])
    try:
      value = float(verifiers.reward(family, response, int(batch.answers[ro.group_index[n]]),
                                     context=context))
    except Exception as e:  # pylint: disable=broad-except  (any verifier failure drops it)
      dropped.append({"prompt_id": pid, "family": family, "row": n,
                      "error": f"{type(e).__name__}: {e}"})
      continue
    if not math.isfinite(value):
      dropped.append({"prompt_id": pid, "family": family, "row": n,
                      "error": f"non-finite reward {value}"})
      continue
    rewards[n] = value
  return rewards, dropped


def _filled_rewards(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Dropped (NaN) rewards replaced by their group's mean of valid ones (advantage 0)."""
  r = rewards.reshape(-1, group_size)
  valid = np.isfinite(r)
  mean = np.where(valid.any(-1), np.nansum(np.where(valid, r, 0), -1) / np.maximum(
      valid.sum(-1), 1), 0.0)
  return np.where(valid, r, mean[:, None]).reshape(-1).astype(np.float32)


def heldout_rewards(config: ml_collections.ConfigDict, model: nnx.Module,
                    context: verifiers.RewardContext, lengths: dict[str, int]
                    ) -> dict[str, float]:
  """Mean reward per family of rl.eval_samples sampled responses to rl.eval_prompts prompts.

  The held-out split's first prompts, the same samples every time (key(seed, family)).
  """
  rl, out = config.rl, {}
  sampling = Sampling(temperature=rl.temperature, top_p=rl.top_p)
  for f_index, family in enumerate(rl.families):
    batch = _prompts(config, family, split="test", start=0, num=rl.eval_prompts,
                     length=lengths[family])
    ro = rollout_lib.rollout(model, batch, group_size=rl.eval_samples,
                             max_new_tokens=rl.max_new_tokens, sampling=sampling,
                             rng=jax.random.fold_in(jax.random.key(config.seed), f_index),
                             layout=context.layout)
    rewards, _ = score(family, batch, ro, context)
    out[family] = float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")
  return out


METRICS_FILE = "rl_metrics.jsonl"  # In the workdir: one {"iteration", **metrics} per line.


def _append_jsonl(workdir: str, iteration: int, metrics: dict[str, float]) -> None:
  """Appends one line to <workdir>/rl_metrics.jsonl (a resumed run may repeat iterations)."""
  with epath.Path(workdir, METRICS_FILE).open("a") as f:
    f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")


def read_metrics(workdir: str) -> dict[int, dict[str, float]]:
  """{iteration: metrics} of a run's rl_metrics.jsonl (the last line wins per iteration)."""
  out: dict[int, dict[str, float]] = {}
  with epath.Path(workdir, METRICS_FILE).open() as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        out.setdefault(row.pop("iteration"), {}).update(row)
  return dict(sorted(out.items()))


def train_rl(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, RLState]:
  """Runs (or resumes) RL post-training of config in workdir; module docstring."""
  input_pipeline.validate(config)
  rl, t = config.rl, config.train
  if t.init_from:
    store.locate(t.init_from)  # A wrong path fails before anything is built.
  store.ensure_writable(workdir)
  store.save_config(config, workdir)
  writer = metric_writers.create_default_writer(workdir)

  tx, _ = optimizer.create_optimizer(config, num_steps=rl.iterations * rl.updates)
  graphdef, abstract = state_lib.abstract_train_state(config, tx)
  manager = create_manager(workdir, keep=t.keep_checkpoints)
  restored = restore(manager, abstract)
  if restored is not None:
    state, rl_state = restored
    logging.info("Resumed RL from iteration %d in %s.", rl_state.iteration, manager.directory)
  elif t.init_from:
    state, rl_state = checkpoint.init_from(config, tx, t.init_from), RLState()
    logging.info("RL starts from the weights of %s.", t.init_from)
  else:
    state, rl_state = state_lib.init_train_state(config, tx)[1], RLState()
    logging.warning("RL starts from a random model (train.init_from is empty).")
  if rl_state.iteration >= rl.iterations:
    logging.info("Nothing to do: iteration %d >= rl.iterations=%d.", rl_state.iteration,
                 rl.iterations)
    manager.close()
    writer.close()
    return state, rl_state

  context = verifiers.make_context(config, classifier="caption_image" in rl.families)
  lengths = prompt_lengths(config)
  buffer = buffer_lib.ReplayBuffer(rl.group_size)
  if rl_state.buffer is not None:
    buffer.load_state_dict(rl_state.buffer)
  forward, update = _compiled(config, graphdef, tx)
  sampling = Sampling(temperature=rl.temperature, top_p=rl.top_p)
  rollout_dtype = None if rl.rollout_dtype == "float32" else jnp.dtype(rl.rollout_dtype)
  key = jax.random.fold_in(jax.random.key(config.seed), RL_STREAM)
  g, width = rl.group_size, 0
  if rl_state.iteration == 0:  # The starting point's held-out rewards (the SFT model's).
    held = heldout_rewards(config, nnx.merge(graphdef, state.params, state.rest), context,
                           lengths)
    start = {**{f"heldout/reward/{f}": v for f, v in held.items()},
             "heldout/reward": float(np.nanmean(list(held.values())))}
    writer.write_scalars(0, start)
    _append_jsonl(workdir, 0, start)
  try:
    for it in range(rl_state.iteration, rl.iterations):
      metrics, dropped_now = {}, []
      model = nnx.merge(graphdef, state.params, state.rest)
      batches, rollouts = {}, {}
      for f_index, family in enumerate(rl.families):
        batch = _prompts(config, family, split="train", start=it * rl.prompts_per_family,
                         num=rl.prompts_per_family, length=lengths[family])
        if rl.hints and batch.response_kind == "text":
          pass_rate = rl_state.pass_rate.get(family, 0.0)
          frac = float(obj.hint_fraction(it, pass_rate, p0=rl.hint_p0, gamma=rl.hint_gamma))
          batch = verifiable.with_hints(batch, np.full((len(batch.prompt_ids),), frac))
          metrics[f"rl/hint_fraction/{family}"] = frac
        ro = rollout_lib.rollout(
            model, batch, group_size=g, max_new_tokens=rl.max_new_tokens, sampling=sampling,
            rng=jax.random.fold_in(jax.random.fold_in(key, it), f_index), dtype=rollout_dtype,
            layout=context.layout)
        batches[family], rollouts[family] = batch, ro
      # The iteration's groups, in a fixed order; released whole and in order (rl/buffer.py).
      group_ids = [f"{family}:{int(pid)}" for family in rl.families
                   for pid in batches[family].prompt_ids]
      buffer.start_iteration(group_ids, drop_pending=True)
      for family in rl.families:  # A rollout is complete once its generation has ended.
        for p, pid in enumerate(batches[family].prompt_ids):
          buffer.add_group(f"{family}:{int(pid)}", list(range(p * g, (p + 1) * g)))
      released = {gid for gid, _ in buffer.ready()}

      # Rewards, then every family's rows in one right-padded batch (one compiled shape).
      fam = list(rl.families)
      rewards, keep_rows = [], []
      for family in fam:
        batch, ro = batches[family], rollouts[family]
        r, dropped = score(family, batch, ro, context)
        dropped_now += dropped
        rewards.append(r)
        keep_rows.append(np.isfinite(r) & np.array(
            [f"{family}:{int(pid)}" in released for pid in ro.prompt_ids]))
      width = max(max(rollouts[f].tokens.shape[1] for f in fam), width)
      fields, mask, infer, expert_ids = concat_rollouts([rollouts[f] for f in fam], width)
      mask = mask * jnp.asarray(np.concatenate(keep_rows), jnp.float32)[:, None]
      filled = jnp.asarray(np.concatenate([_filled_rewards(r, g) for r in rewards]))
      replay = expert_ids if rl.router_replay else None
      logp_old, entropy = forward(state.params, state.rest, fields, replay)
      logp_other, _ = forward(state.params, state.rest, fields,
                              None if rl.router_replay else expert_ids)
      keep = (obj.misc_mask(logp_old, infer, mask, alpha=rl.misc_alpha, beta=rl.misc_beta)
              if rl.misc else mask)
      seq_entropy = obj.masked_sequence_mean(entropy, mask)  # [N]
      weights = (obj.wpsm_weights(filled, g, seq_entropy, solved_threshold=rl.wpsm_tau,
                                  entropy_threshold=rl.wpsm_eta, down_weight=rl.wpsm_a)
                 if rl.wpsm else jnp.ones(filled.shape, jnp.float32))
      advantages = obj.group_advantages(filled, g)
      rl_batch = {"logp_old": logp_old, "mask": keep, "advantages": advantages,
                  "weights": weights}
      other_name = "live" if rl.router_replay else "replay"
      start = 0
      for family, r in zip(fam, rewards):  # Per-family metrics on the family's rows.
        rows = slice(start, start + len(r))
        start += len(r)
        m = mask[rows]
        rate = float(np.mean(obj.pass_rates(filled[rows], g)))
        rl_state.pass_rate[family] = rate
        metrics.update({
            f"rl/reward/{family}": float(np.nanmean(r)) if np.isfinite(r).any() else 0.0,
            f"rl/pass_rate/{family}": rate,
            f"rl/entropy/{family}": float(jnp.sum(entropy[rows] * m) / jnp.maximum(m.sum(), 1)),
            f"rl/mismatch_kl/{family}": float(obj.mismatch_kl(logp_old[rows], infer[rows], m)),
            f"rl/mismatch_kl_{other_name}/{family}": float(
                obj.mismatch_kl(logp_other[rows], infer[rows], m)),
            f"rl/misc_masked/{family}": float(obj.masked_fraction(m, keep[rows])),
            f"rl/wpsm_down_weighted/{family}": float(jnp.mean(weights[rows] < 1)),
            f"rl/response_tokens/{family}": float(np.mean(rollouts[family].response_mask.sum(-1))),
        })
      for _ in range(rl.updates):
        state, step_metrics = update(state, fields, replay, rl_batch)
      metrics.update({k: float(v) for k, v in step_metrics.items()})
      metrics["rl/reward"] = float(np.mean([metrics[f"rl/reward/{f}"] for f in fam]))
      metrics["rl/entropy"] = float(np.mean([metrics[f"rl/entropy/{f}"] for f in fam]))
      metrics["rl/mismatch_kl"] = float(obj.mismatch_kl(logp_old, infer, mask))
      metrics[f"rl/mismatch_kl_{other_name}"] = float(obj.mismatch_kl(logp_other, infer, mask))
      metrics["rl/misc_masked"] = float(np.mean([metrics[f"rl/misc_masked/{f}"] for f in fam]))
      metrics["rl/dropped"] = float(len(dropped_now))
      for d in dropped_now:
        logging.warning("RL iteration %d dropped a sample of prompt %d (%s): %s", it + 1,
                        d["prompt_id"], d["family"], d["error"])
      rl_state.dropped += [dict(d, iteration=it + 1) for d in dropped_now]
      rl_state.iteration = it + 1
      rl_state.buffer = buffer.state_dict(with_payload=True)
      last = it + 1 == rl.iterations
      if rl_state.iteration % rl.eval_every == 0 or last:
        held = heldout_rewards(config, nnx.merge(graphdef, state.params, state.rest), context,
                               lengths)
        metrics.update({f"heldout/reward/{f}": v for f, v in held.items()})
        metrics["heldout/reward"] = float(np.nanmean(list(held.values())))
      if rl_state.iteration % t.log_every == 0 or last or "heldout/reward" in metrics:
        writer.write_scalars(rl_state.iteration, metrics)
        _append_jsonl(workdir, rl_state.iteration, metrics)
      if not all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("heldout")):
        raise FloatingPointError(f"non-finite RL metrics at iteration {rl_state.iteration}: "
                                 f"{ {k: v for k, v in metrics.items() if not math.isfinite(v)} }"
                                 "; stopping without saving")
      if rl_state.iteration % t.checkpoint_every == 0 or last:
        save(manager, state, rl_state)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
  return state, rl_state
