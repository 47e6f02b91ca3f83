"""The RL loop (rl/train.py): resumed == uninterrupted, dropped samples, RL state, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import store
from ernie5_jax.input_pipeline import multimodal
from ernie5_jax.rl import engine as engine_lib
from ernie5_jax.rl import objective as obj
from ernie5_jax.rl import train as rl_train
from ernie5_jax.rl import verifiers
from ernie5_jax.train import metrics

BAD_PROMPT = 1  # The training prompt (index) whose verifier raises.
BAD_ITERATION = 2  # The iteration whose advantages (and so loss) are NaN.


def _config(tmp_path_factory, iterations):
  cfg = config_lib.default_config()
  cfg.data.update(source="digits_sft", dataset="digits_multimodal/tiny", seq_len=128,
                  data_dir=str(tmp_path_factory.getbasetemp() / "shared_data"))
  layout = multimodal.vocabulary_layout(cfg.data)
  cfg.model.update(vocab_size=layout.vocab_size, audio_levels=layout.audio_levels,
                   audio_codebook_size=layout.audio_codebook_size, d_model=32, num_heads=2,
                   num_kv_heads=1, head_dim=16, rope_sections=(4, 2, 2), num_layers=2,
                   num_dense_layers=1, num_experts=4, num_shared_experts=0, expert_hidden=16,
                   dense_hidden=64, top_k=2, audio_head_hidden=32)
  cfg.objective.update(mtp_depth=0, audio_level_weights=(1.0,) * (layout.audio_levels - 1))
  # eval_prompts 2 x 2 samples = the training rollouts' 2 prompts x 2: one set of compiled
  # decode steps serves every rollout.
  cfg.rl.update(families=("image_digit",), iterations=iterations, prompts_per_family=2,
                group_size=2, max_new_tokens=2, updates=1, eval_every=2, eval_prompts=2,
                eval_samples=2, rollout_dtype="bfloat16", wpsm_tau=0.4)  # < (G - 1) / G
  cfg.train.update(log_every=1, checkpoint_every=1)
  cfg.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  config_lib.validate(cfg)
  return cfg


class _Killed(Exception):
  """Stands for the process dying right after a checkpoint was written."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two iterations straight through, and the same run killed after iteration 1 and resumed.

  A verifier fails on one prompt's rollouts every iteration.
  """
  real_reward, real_score, real_save = verifiers.reward, rl_train.score, rl_train.save
  rows = []  # The rows scored so far by the current score() call.

  def flaky(family, response, answer, *, context):
    rows.append(len(rows))
    if rows[-1] == 2 * BAD_PROMPT:  # Prompt 1's first rollout: the verifier raises ...
      raise RuntimeError("verifier crashed")
    if rows[-1] == 2 * BAD_PROMPT + 1:  # ... and its second one gets a non-finite reward.
      return float("nan")
    return real_reward(family, response, answer, context=context)

  def counting_score(*args, **kwargs):
    rows.clear()
    return real_score(*args, **kwargs)

  def save_then_die(manager, state, rl_state):
    real_save(manager, state, rl_state)
    raise _Killed()

  config = _config(tmp_path_factory, 2)
  mp = pytest.MonkeyPatch()
  mp.setattr(verifiers, "reward", flaky)
  mp.setattr(rl_train, "score", counting_score)
  try:
    straight = tmp_path_factory.mktemp("straight")
    state_a, rl_a = rl_train.train_rl(config, str(straight))
    resumed = tmp_path_factory.mktemp("resumed")
    with mp.context() as kill:
      kill.setattr(rl_train, "save", save_then_die)
      with pytest.raises(_Killed):
        rl_train.train_rl(config, str(resumed))
    assert rl_train.create_manager(str(resumed), keep=3).all_steps() == [1]
    state_b, rl_b = rl_train.train_rl(config, str(resumed))
  finally:
    mp.undo()
  return dict(a=(state_a, rl_a), b=(state_b, rl_b), straight=straight, resumed=resumed)


def test_resumed_run_equals_uninterrupted(runs):
  (state_a, rl_a), (state_b, rl_b) = runs["a"], runs["b"]
  assert int(state_a.step) == int(state_b.step) == 2  # 2 iterations x 1 update
  assert rl_a.iteration == rl_b.iteration == 2
  for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert rl_a.pass_rate == rl_b.pass_rate


def test_params_moved_and_rl_state_is_checkpointed(runs):
  (state_a, rl_a) = runs["a"]
  manager = rl_train.create_manager(str(runs["straight"]), keep=3)
  assert manager.all_steps()[-1] == 2
  with open(runs["straight"] / "checkpoints" / "2" / "rl" / "metadata") as f:
    saved = json.load(f)
  assert saved["iteration"] == 2 and saved["buffer"]["group_size"] == 2
  assert set(rl_a.pass_rate) == {"image_digit"}


def test_failing_verifier_drops_and_reports_the_sample(runs):
  _, rl_a = runs["a"]
  # Each iteration, prompt 1's two rollouts are dropped: one raised, one was NaN.
  assert len(rl_a.dropped) == 4
  first = sorted((d for d in rl_a.dropped if d["iteration"] == 1), key=lambda d: d["row"])
  assert [d["row"] for d in first] == [2, 3]
  assert "RuntimeError: verifier crashed" in first[0]["error"]
  assert "non-finite reward nan" in first[1]["error"]
  assert first[0]["prompt_id"] == first[1]["prompt_id"]


def test_update_step_compiles_once_from_init_weights(runs, tmp_path_factory, tmp_path,
                                                     monkeypatch):
  # train.init_from: restored (committed) weights beside a fresh (uncommitted) step and
  # optimizer; iteration 2 gets update_step's own, all committed, outputs. Unless the loop
  # commits the state first, that second signature compiles update_step again.
  config = _config(tmp_path_factory, 2)
  config.train.init_from = str(runs["straight"])
  engines = []

  class Recorded(engine_lib.Engine):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      engines.append(self)

  monkeypatch.setattr(engine_lib, "Engine", Recorded)
  state, _ = rl_train.train_rl(config, str(tmp_path))
  assert int(state.step) == 2 * config.rl.updates
  assert engines[0].update_step._cache_size() == 1  # pylint: disable=protected-access


def test_non_finite_loss_stops_without_saving_and_keeps_last_good_checkpoint(
    tmp_path_factory, tmp_path, monkeypatch):
  config = _config(tmp_path_factory, 3)
  real_advantages, calls = obj.group_advantages, []

  def poisoned(rewards, group_size, **kwargs):  # Called once per iteration (engine.prepare).
    calls.append(len(calls) + 1)
    advantages = real_advantages(rewards, group_size, **kwargs)
    return advantages * jnp.nan if calls[-1] == BAD_ITERATION else advantages

  monkeypatch.setattr(obj, "group_advantages", poisoned)
  with pytest.raises(metrics.NonFiniteLossError) as info:
    rl_train.train_rl(config, str(tmp_path))
  message = str(info.value)
  assert (f"non-finite loss (nan) at iteration {BAD_ITERATION}: stopping without saving this "
          "state; the last good checkpoint (iteration 1)") in message
  assert "Lower config.optimizer.learning_rate" in message
  # Iteration 2's state was never written, nor its metrics; iteration 1's checkpoint restores.
  manager = rl_train.create_manager(str(tmp_path), keep=3)
  assert manager.all_steps() == [1]
  assert list(rl_train.read_metrics(str(tmp_path))) == [0, 1]
  monkeypatch.undo()
  config.rl.iterations = 1  # The kept checkpoint is a finished 1-iteration run.
  state, rl_state = rl_train.train_rl(config, str(tmp_path))
  assert rl_state.iteration == 1 and int(state.step) == config.rl.updates
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_missing_init_checkpoint_is_a_clear_error(tmp_path_factory, tmp_path):
  config = _config(tmp_path_factory, 1)
  config.train.init_from = str(tmp_path / "no_sft_here")
  with pytest.raises(store.CheckpointNotFoundError, match="no_sft_here"):
    rl_train.train_rl(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_rl_config_errors_name_the_field():
  config = config_lib.default_config()
  config.rl.group_size = 1
  with pytest.raises(config_lib.ConfigError, match=r"config.rl.group_size=1 is not accepted: "
                     r"expected an int >= 2"):
    config_lib.validate(config)
  config = config_lib.default_config()
  config.rl.wpsm_tau = 0.75  # group_size 4: only 4 of 4 passes exceed it, and then no
  with pytest.raises(config_lib.ConfigError,  # rollout is above its group's mean.
                     match=r"config.rl.wpsm_tau=0.75 is not accepted: expected < "
                     r"\(group_size - 1\) / group_size = 0.75"):
    config_lib.validate(config)
  config = config_lib.default_config()
  config.rl.misc_alpha = 1.5
  with pytest.raises(config_lib.ConfigError, match=r"misc_alpha < 1 < misc_beta"):
    config_lib.validate(config)
