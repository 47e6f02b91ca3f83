"""Checkpoint tests on a small stand-in nnx model (the real Decoder runs in test_loop/test_main)."""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ernie5_jax import input_pipeline
from ernie5_jax import store
from ernie5_jax.model.router import RouterBias
from ernie5_jax.train import checkpoint
from ernie5_jax.train.state import TrainState

from tiny_train_config import make_tiny_config


class _StandIn(nnx.Module):
  """Params of two kinds plus a RouterBias: what the checkpoint code has to carry."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.proj = nnx.Linear(3, width, rngs=rngs)
    self.norm = nnx.RMSNorm(width, rngs=rngs)
    self.bias = RouterBias(jnp.arange(8, dtype=jnp.float32).reshape(2, 4))


TX = optax.adamw(1e-3)


def _state(width=4, seed=0, step=0):
  _, params, rest = nnx.split(_StandIn(width, nnx.Rngs(seed)), nnx.Param, ...)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, rest=rest,
                    opt_state=TX.init(params))


def _abstract(width=4):
  return jax.eval_shape(lambda: _state(width))


def _iterator():
  return input_pipeline.create_train_iterator(make_tiny_config())


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _digest(directory):
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_restores_state_and_data_position(tmp_path, async_save):
  state = _state(seed=3, step=7)
  state = state.replace(opt_state=TX.update(
      jax.tree.map(jnp.ones_like, state.params), state.opt_state, state.params)[1])
  data = _iterator()
  next(data), next(data)
  manager = checkpoint.create_manager(str(tmp_path), keep=2, async_save=async_save)
  checkpoint.save(manager, state, data)
  upcoming = next(data)  # Advancing right after save must not change what was saved.
  manager.wait_until_finished()

  fresh_data = _iterator()
  restored = checkpoint.restore(checkpoint.create_manager(str(tmp_path), keep=2,
                                                          async_save=async_save),
                                _abstract(), fresh_data)
  _assert_trees_equal(restored, state)
  assert isinstance(restored.step, jax.Array) and int(restored.step) == 7
  for key, value in next(fresh_data).items():
    np.testing.assert_array_equal(value, upcoming[key])


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  # The README's command passes --workdir=workdirs/tiny: orbax's async save needs an
  # absolute path, which create_manager must supply.
  monkeypatch.chdir(tmp_path)
  manager = checkpoint.create_manager("workdirs/run", keep=2, async_save=True)
  checkpoint.save(manager, _state(seed=1, step=3), _iterator())
  manager.wait_until_finished()
  assert os.path.isdir(tmp_path / "workdirs/run" / store.CHECKPOINT_SUBDIR / "3")
  restored = checkpoint.restore(checkpoint.create_manager("workdirs/run", keep=2,
                                                          async_save=True),
                                _abstract(), _iterator())
  _assert_trees_equal(restored, _state(seed=1, step=3))


def test_latest_step_is_restored_and_only_n_are_kept(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), keep=2, async_save=True)
  data = _iterator()
  for step in (4, 8, 12):
    checkpoint.save(manager, _state(seed=step, step=step), data)
  manager.wait_until_finished()
  assert manager.all_steps() == [8, 12]
  restored = checkpoint.restore(manager, _abstract(), _iterator())
  _assert_trees_equal(restored, _state(seed=12, step=12))


def test_empty_directory_restores_nothing(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), keep=2, async_save=False)
  assert checkpoint.restore(manager, _abstract(), _iterator()) is None


def test_mismatched_shape_names_the_parameter_and_leaves_checkpoint_untouched(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path), keep=2, async_save=False)
  checkpoint.save(manager, _state(width=4, step=5), _iterator())
  before = _digest(tmp_path)
  with pytest.raises(store.CheckpointMismatchError) as info:
    checkpoint.restore(manager, _abstract(width=6), _iterator())
  message = str(info.value)
  assert "model/proj/kernel: checkpoint shape (3, 4) != model shape (3, 6)" in message
  assert "model/norm/scale: checkpoint shape (4,) != model shape (6,)" in message
  assert "nothing was restored" in message and "\n" not in message  # The CLI's one line.
  assert _digest(tmp_path) == before
  # The checkpoint still restores into the model it came from.
  restored = checkpoint.restore(manager, _abstract(width=4), _iterator())
  _assert_trees_equal(restored, _state(width=4, step=5))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = str(blocker / "run")
  with pytest.raises(store.WorkdirError, match=r"--workdir=.*a_file/run.* not accepted"):
    store.ensure_writable(workdir)
  store.ensure_writable(str(tmp_path / "new" / "run"))  # created on demand
  assert os.listdir(tmp_path / "new" / "run") == []  # the write probe is gone
