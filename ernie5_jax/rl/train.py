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
5. The training engine (rl/engine.py, float32) recomputes log pi_old(y) with the rollout's
   expert ids (rl.router_replay; live routing otherwise), and the token entropy. MISC keeps a
   token only when pi_train / pi_infer is in [misc_alpha, misc_beta]; WPSM down-weights
   positive rollouts of solved, low-entropy queries; advantages are group-normalised.
   rl.updates AdamW steps on the GSPO loss (or the token-clip baseline, rl.loss), every
   family's rows in one padded shape. The router bias stays frozen (no load-balancing
   updates in post-training).

The loop has pre-training's skeleton (train/loop.py): the same sections, train/metrics.py's
non-finite check (a NaN loss or parameter stops the run before it is saved, naming the
iteration and the checkpoint kept: NonFiniteLossError) and its summary of the iterations
since the last write, the one checkpoint writer. Metrics (console, TensorBoard and
<workdir>/rl_metrics.jsonl): rl/reward and rl/pass_rate per family, entropy, clip / MISC /
WPSM fractions, the training-inference mismatch KL (k3) and its value with the other routing
choice, dropped samples; heldout/reward/<family> every rl.eval_every iterations
(rl.eval_samples sampled responses per held-out prompt). Checkpoints (every
train.checkpoint_every iterations and the last) hold the model, the optimizer, and the RL
state (iteration, buffer, pass rates, dropped samples) as JSON; a resumed run draws the same
prompts and samples as an uninterrupted one (all randomness is folded from (seed, t)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from etils import epath

from ernie5_jax import input_pipeline, store
from ernie5_jax.input_pipeline import verifiable
from ernie5_jax.model import create_model
from ernie5_jax.rl import buffer as buffer_lib
from ernie5_jax.rl import engine as engine_lib
from ernie5_jax.rl import objective as obj
from ernie5_jax.rl import rollout as rollout_lib
from ernie5_jax.rl import verifiers
from ernie5_jax.train import checkpoint, optimizer
from ernie5_jax.train import metrics as metrics_lib
from ernie5_jax.train import state as state_lib
from ernie5_jax.train.state import TrainState

RL_STREAM = 0x51  # Folded into key(config.seed): the rollouts' own random stream.
_PROMPT_LEN_SAMPLE = 64  # Prompts per family measured to fix the padded prompt length.
METRICS_FILE = "rl_metrics.jsonl"  # In the workdir: one {"iteration", **metrics} per line.


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


# --- prompts ---------------------------------------------------------------------------------
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


# --- rewards ---------------------------------------------------------------------------------
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


def heldout_rewards(config: ml_collections.ConfigDict, engine: engine_lib.Engine,
                    model, context: verifiers.RewardContext, lengths: dict[str, int]
                    ) -> dict[str, float]:
  """Mean reward per family of rl.eval_samples sampled responses to rl.eval_prompts prompts.

  The held-out split's first prompts, the same samples every time (key(seed, family)).
  """
  rl, out = config.rl, {}
  for f_index, family in enumerate(rl.families):
    batch = _prompts(config, family, split="test", start=0, num=rl.eval_prompts,
                     length=lengths[family])
    ro = engine.rollout(model, batch, group_size=rl.eval_samples,
                        rng=jax.random.fold_in(jax.random.key(config.seed), f_index))
    rewards, _ = score(family, batch, ro, context)
    out[family] = float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")
  return out


def _heldout_metrics(held: dict[str, float]) -> dict[str, float]:
  """heldout/reward/<family> and their mean heldout/reward."""
  return {**{f"heldout/reward/{f}": v for f, v in held.items()},
          "heldout/reward": float(np.nanmean(list(held.values())))}


# --- the metrics file -------------------------------------------------------------------------
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


# --- one iteration's pieces -------------------------------------------------------------------
def _rollouts(config: ml_collections.ConfigDict, engine: engine_lib.Engine, model,
              rl_state: RLState, lengths: dict[str, int], key: jax.Array, it: int
              ) -> tuple[dict[str, verifiable.PromptBatch], dict[str, rollout_lib.Rollouts],
                         dict[str, float]]:
  """Iteration it's prompts and rollouts per family (module docstring, 1-2), hint metrics."""
  rl = config.rl
  batches, rollouts, metrics = {}, {}, {}
  for f_index, family in enumerate(rl.families):
    batch = _prompts(config, family, split="train", start=it * rl.prompts_per_family,
                     num=rl.prompts_per_family, length=lengths[family])
    if rl.hints and batch.response_kind == "text":
      pass_rate = rl_state.pass_rate.get(family, 0.0)
      frac = float(obj.hint_fraction(it, pass_rate, p0=rl.hint_p0, gamma=rl.hint_gamma))
      batch = verifiable.with_hints(batch, np.full((len(batch.prompt_ids),), frac))
      metrics[f"rl/hint_fraction/{family}"] = frac
    batches[family] = batch
    rollouts[family] = engine.rollout(
        model, batch, group_size=rl.group_size,
        rng=jax.random.fold_in(jax.random.fold_in(key, it), f_index), dtype=engine.rollout_dtype)
  return batches, rollouts, metrics


def _released(buffer: buffer_lib.ReplayBuffer, batches: dict[str, verifiable.PromptBatch],
              group_size: int) -> set[str]:
  """The iteration's groups, in a fixed order, through the buffer: those it releases."""
  group_ids = [f"{family}:{int(pid)}" for family, batch in batches.items()
               for pid in batch.prompt_ids]
  buffer.start_iteration(group_ids, drop_pending=True)
  for family, batch in batches.items():  # A rollout is complete once its generation has ended.
    for p, pid in enumerate(batch.prompt_ids):
      buffer.add_group(f"{family}:{int(pid)}", list(range(p * group_size, (p + 1) * group_size)))
  return {gid for gid, _ in buffer.ready()}


def _score_all(batches: dict[str, verifiable.PromptBatch],
               rollouts: dict[str, rollout_lib.Rollouts], released: set[str],
               context: verifiers.RewardContext
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, Any]]]:
  """Per family: rewards [N_f] (NaN: dropped), the rows to train on [N_f]; dropped records."""
  rewards, keep_rows, dropped_all = [], [], []
  for family, ro in rollouts.items():
    r, dropped = score(family, batches[family], ro, context)
    dropped_all += dropped
    rewards.append(r)
    keep_rows.append(np.isfinite(r) & np.array(
        [f"{family}:{int(pid)}" in released for pid in ro.prompt_ids]))
  return rewards, keep_rows, dropped_all


def _iteration_metrics(rollouts: dict[str, rollout_lib.Rollouts], rewards: list[np.ndarray],
                       batch: engine_lib.Batch, step: dict[str, Any]) -> dict[str, float]:
  """Per family on its rows (rewards, pass rate, diagnostics), the last update's, overall."""
  families = list(rollouts)
  metrics, start = {}, 0
  for family, r in zip(families, rewards):
    rows = slice(start, start + len(r))
    start += len(r)
    metrics.update({
        f"rl/reward/{family}": float(np.nanmean(r)) if np.isfinite(r).any() else 0.0,
        f"rl/pass_rate/{family}": float(np.mean(obj.pass_rates(batch.rewards[rows],
                                                               rollouts[family].group_size))),
        **{f"rl/{k}/{family}": v for k, v in batch.diagnostics(rows).items()},
        f"rl/response_tokens/{family}": float(np.mean(rollouts[family].response_mask.sum(-1))),
    })
  metrics.update({f"rl/{k}": float(v) for k, v in step.items() if k != "params_finite"})
  for name in ("reward", "entropy", "misc_masked"):  # The families' mean.
    metrics[f"rl/{name}"] = float(np.mean([metrics[f"rl/{name}/{f}"] for f in families]))
  # The mismatch KL over every row.
  metrics.update({f"rl/{k}": v for k, v in batch.diagnostics().items()
                  if k.startswith("mismatch_kl")})
  return metrics


def _check_metrics(metrics: dict[str, float], iteration: int, manager) -> None:
  """NonFiniteLossError if a training metric (held-out rewards aside) is not finite."""
  bad = {k: v for k, v in metrics.items() if not k.startswith("heldout") and not math.isfinite(v)}
  if bad:
    raise metrics_lib.non_finite_error(f"non-finite RL metrics {bad}", iteration, manager,
                                       unit="iteration")


# --- the loop ---------------------------------------------------------------------------------
def train_rl(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, RLState]:
  """Runs (or resumes) RL post-training of config in workdir; module docstring."""
  input_pipeline.validate(config)
  rl, t = config.rl, config.train
  if t.init_from:
    store.locate(t.init_from)  # A wrong path fails before anything is built.

  # --- logging -------------------------------------------------------------
  store.ensure_writable(workdir)
  writer = metric_writers.create_default_writer(workdir)

  # --- model + optimizer ---------------------------------------------------
  tx, _ = optimizer.create_optimizer(config, num_steps=rl.iterations * rl.updates)
  create = lambda: create_model(config)
  graphdef, abstract = state_lib.abstract_train_state(create, tx)

  # --- checkpoint (the latest, else train.init_from's weights, else random) -
  manager = create_manager(workdir, keep=t.keep_checkpoints)
  restored = restore(manager, abstract)
  if restored is not None:
    state, rl_state = restored
    logging.info("Resumed RL from iteration %d in %s.", rl_state.iteration, manager.directory)
  elif t.init_from:
    state, rl_state = checkpoint.init_from(config, tx, t.init_from), RLState()
    logging.info("RL starts from the weights of %s.", t.init_from)
  else:
    state, rl_state = state_lib.init_train_state(create, tx)[1], RLState()
    logging.warning("RL starts from a random model (train.init_from is empty).")
  # Every leaf committed to the device, as update_step returns them: init_from's fresh step
  # and optimizer state (uncommitted) beside its restored weights would make iteration 2's
  # call a new signature, and update_step would compile a second time.
  state = jax.device_put(state, jax.devices()[0])
  if rl_state.iteration >= rl.iterations:
    logging.info("Nothing to do: iteration %d >= rl.iterations=%d.", rl_state.iteration,
                 rl.iterations)
    manager.close()
    writer.close()
    return state, rl_state
  store.save_config(config, workdir)  # Once the state fits config (a failed resume keeps it).

  # --- input (prompts of a fixed length per family, the verifiers' context) -
  context = verifiers.make_context(config, classifier="caption_image" in rl.families)
  lengths = prompt_lengths(config)
  buffer = buffer_lib.ReplayBuffer(rl.group_size)
  if rl_state.buffer is not None:
    buffer.load_state_dict(rl_state.buffer)

  # --- step (rl/engine.py: this run's compiled rollout and training engines) -
  engine = engine_lib.Engine(config, graphdef, tx, context.layout)
  key = jax.random.fold_in(jax.random.key(config.seed), RL_STREAM)

  # --- loop ----------------------------------------------------------------
  if rl_state.iteration == 0:  # The starting point's held-out rewards (the SFT model's).
    start = _heldout_metrics(heldout_rewards(config, engine, engine.model(state), context,
                                             lengths))
    writer.write_scalars(0, start)
    _append_jsonl(workdir, 0, start)
  history = []  # (iteration, metrics) not yet written.
  try:
    for it in range(rl_state.iteration, rl.iterations):  # it: iterations completed before.
      iteration, last = it + 1, it + 1 == rl.iterations
      batches, rollouts, metrics = _rollouts(config, engine, engine.model(state), rl_state,
                                             lengths, key, it)
      released = _released(buffer, batches, rl.group_size)
      rewards, keep_rows, dropped_now = _score_all(batches, rollouts, released, context)
      for d in dropped_now:
        logging.warning("RL iteration %d dropped a sample of prompt %d (%s): %s", iteration,
                        d["prompt_id"], d["family"], d["error"])
      batch = engine.prepare(state, [rollouts[f] for f in rl.families], rewards, keep_rows)
      state, steps = engine.update(state, batch)
      steps = jax.device_get(steps)
      metrics_lib.check_finite([(iteration, m) for m in steps], manager, unit="iteration")

      metrics.update(_iteration_metrics(rollouts, rewards, batch, steps[-1]))
      metrics["rl/dropped"] = float(len(dropped_now))
      _check_metrics(metrics, iteration, manager)
      rl_state.pass_rate.update({f: metrics[f"rl/pass_rate/{f}"] for f in rl.families})
      rl_state.dropped += [dict(d, iteration=iteration) for d in dropped_now]
      rl_state.iteration = iteration
      rl_state.buffer = buffer.state_dict(with_payload=True)

      if iteration % rl.eval_every == 0 or last:
        metrics.update(_heldout_metrics(heldout_rewards(config, engine, engine.model(state),
                                                        context, lengths)))
      history.append((iteration, metrics))
      if iteration % t.log_every == 0 or last or "heldout/reward" in metrics:
        summary = metrics_lib.summarize(history)
        writer.write_scalars(iteration, summary)
        _append_jsonl(workdir, iteration, summary)
        history = []
      if iteration % t.checkpoint_every == 0 or last:
        save(manager, state, rl_state)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
  return state, rl_state
