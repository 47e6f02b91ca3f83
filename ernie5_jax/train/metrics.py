"""What every trainer (pre-training, M2CP, RL) does with its metrics: check, then summarise.

Each step's metrics hold at least "loss" and "params_finite" (all updated parameters
finite). A trainer fetches them from the device every few steps, calls `check_finite`
before writing or saving anything (so a bad state is never saved and the error names
the first bad step), and writes `summarize` of the interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orbax.checkpoint as ocp

History = list[tuple[int, dict[str, Any]]]  # (step, that step's metrics), in step order.


class NonFiniteLossError(FloatingPointError):
  """The training loss, the updated parameters or a metric became NaN or infinite."""


def non_finite_error(what: str, step: int, manager: ocp.CheckpointManager, *,
                     unit: str = "step") -> NonFiniteLossError:
  """The error for `what` found non-finite at `step`, naming the checkpoint that is kept.

  unit: what the trainer counts and numbers its checkpoints by ("step", RL's "iteration").
  Waits for pending async saves first, so that the checkpoint it names is committed.
  """
  manager.wait_until_finished()
  latest = manager.latest_step()
  kept = (f"the last good checkpoint ({unit} {latest}) in {manager.directory} is kept"
          if latest is not None else "no checkpoint had been written yet")
  return NonFiniteLossError(
      f"{what} at {unit} {step}: stopping without saving this state; {kept}. "
      "Lower config.optimizer.learning_rate or check the data.")


def check_finite(pending: History, manager: ocp.CheckpointManager, *,
                 unit: str = "step") -> None:
  """Raises NonFiniteLossError at the first step whose loss or new parameters are not finite."""
  for step, metrics in pending:
    loss = float(metrics["loss"])
    if np.isfinite(loss) and metrics["params_finite"]:
      continue
    what = (f"non-finite loss ({loss})" if not np.isfinite(loss) else
            f"non-finite parameters after the update (loss {loss:.4g})")
    raise non_finite_error(what, step, manager, unit=unit)


def summarize(history: History) -> dict[str, float]:
  """Means of an interval's metrics; "<kind>/<what>" weighted by "tokens/<what>" if present.

  A weighted metric whose steps counted no tokens is left out (nothing of that kind was
  seen). A metric only some steps have (e.g. an eval every few steps) is the mean of those.
  """
  names = list(dict.fromkeys(name for _, metrics in history for name in metrics))
  out = {}
  for name in names:
    if name.startswith("tokens/") or name == "params_finite":
      continue
    rows = [metrics for _, metrics in history if name in metrics]
    values = np.array([m[name] for m in rows], np.float64)
    counted = "tokens/" + name.partition("/")[2]  # loss/text, accuracy/text -> tokens/text
    if "/" in name and counted in names:
      counts = np.array([m.get(counted, 0) for m in rows], np.float64)
      if counts.sum() > 0:  # Only what was present in the interval.
        out[name] = float(np.sum(values * counts) / counts.sum())
    else:
      out[name] = float(values.mean())
  return out
