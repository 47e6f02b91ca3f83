"""train/metrics.py: the non-finite check and the interval summary every trainer shares."""

import math

import numpy as np
import pytest

from ernie5_jax.train import metrics


class _Manager:
  """The CheckpointManager calls check_finite makes: the latest step and where it lies."""

  def __init__(self, latest):
    self.latest, self.directory, self.waited = latest, "/runs/x/checkpoints", False

  def wait_until_finished(self):
    self.waited = True

  def latest_step(self):
    return self.latest


def _step(loss, params_finite=1.0, **extra):
  return {"loss": np.float32(loss), "params_finite": np.float32(params_finite), **extra}


def test_check_finite_names_the_first_bad_step_and_the_kept_checkpoint():
  manager = _Manager(latest=4)
  pending = [(5, _step(1.0)), (6, _step(float("nan"))), (7, _step(float("inf")))]
  with pytest.raises(metrics.NonFiniteLossError) as info:
    metrics.check_finite(pending, manager)
  assert str(info.value) == (
      "non-finite loss (nan) at step 6: stopping without saving this state; the last good "
      "checkpoint (step 4) in /runs/x/checkpoints is kept. Lower "
      "config.optimizer.learning_rate or check the data.")
  assert manager.waited  # The kept checkpoint is committed before it is named.
  assert isinstance(info.value, FloatingPointError)


def test_check_finite_catches_non_finite_parameters_behind_a_finite_loss():
  with pytest.raises(metrics.NonFiniteLossError,
                     match=r"^non-finite parameters after the update \(loss 2\.5\) at "
                     r"iteration 3: .* no checkpoint had been written yet\."):
    metrics.check_finite([(3, _step(2.5, params_finite=0.0))], _Manager(latest=None),
                         unit="iteration")


def test_check_finite_passes_finite_steps():
  manager = _Manager(latest=None)
  metrics.check_finite([(1, _step(3.0)), (2, _step(-1e30))], manager)
  assert not manager.waited


def test_summarize_weights_by_token_counts():
  history = [
      (1, {"loss": 2.0, "loss/text": 1.0, "tokens/text": 3.0, "accuracy/text": 0.5,
           "loss/image": 0.0, "tokens/image": 0.0, "params_finite": 1.0, "grad_norm": 1.0}),
      (2, {"loss": 4.0, "loss/text": 3.0, "tokens/text": 1.0, "accuracy/text": 1.0,
           "loss/image": 0.0, "tokens/image": 0.0, "params_finite": 1.0, "grad_norm": 3.0}),
  ]
  summary = metrics.summarize(history)
  # A naive reference: token-weighted means of "<kind>/<what>", plain means otherwise.
  assert summary == pytest.approx({
      "loss": 3.0, "grad_norm": 2.0,
      "loss/text": (1.0 * 3 + 3.0 * 1) / 4, "accuracy/text": (0.5 * 3 + 1.0 * 1) / 4})
  # Counts and the finiteness flag are not metrics; no image tokens: no image loss.
  assert not {"tokens/text", "params_finite", "loss/image"} & summary.keys()


def test_summarize_plain_means_without_counts_and_metrics_some_steps_have():
  history = [(1, {"ce/fused": 1.0, "pseudo/fraction": 0.25}),
             (2, {"ce/fused": 2.0, "pseudo/fraction": 0.75, "heldout/reward": 0.5})]
  summary = metrics.summarize(history)
  assert summary == {"ce/fused": 1.5, "pseudo/fraction": 0.5, "heldout/reward": 0.5}
  assert all(isinstance(v, float) and math.isfinite(v) for v in summary.values())
