"""The model store (ernie5_jax/store.py): models found by path, relative paths included."""

import numpy as np
from flax import nnx

from ernie5_jax import store
from ernie5_jax.model import create_model
from ernie5_jax.train import checkpoint, optimizer
from ernie5_jax.train import state as state_lib
from tiny_train_config import make_tiny_config  # tests/train (pytest.ini pythonpath)


def test_relative_paths_restore_like_absolute_ones(tmp_path, monkeypatch):
  # The README's commands pass workdirs/tiny (relative): orbax reads no metadata from a
  # relative path, so the store resolves every path against the current directory first.
  config = make_tiny_config()
  model = create_model(config)
  monkeypatch.chdir(tmp_path)
  store.save_model("runs/export", config, nnx.state(model))
  tx, _ = optimizer.create_optimizer(config)
  manager = checkpoint.create_manager("runs/train", keep=1, async_save=False, data=False)
  checkpoint.save(manager, state_lib.new_train_state(model, tx))
  store.save_config(config, "runs/train")
  for path in ("runs/export", "runs/train", "runs/train/checkpoints", "runs/train/checkpoints/0"):
    loc = store.locate(path)
    assert loc.model_dir.is_absolute() and loc.config_path is not None, path
    _, restored = store.restore_model(path)
    want = nnx.state(model, nnx.Param)
    got = nnx.state(restored, nnx.Param)
    for a, b in zip(jax_leaves(want), jax_leaves(got)):
      np.testing.assert_array_equal(a, b)


def jax_leaves(state):
  """The arrays of an nnx.State, in a fixed order."""
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_lm_only_jobs_refuse_another_family_by_name(tmp_path):
  # An M2CP workdir (config.trainer='m2cp') given to eval / export / generate.
  from ernie5_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  config = make_tiny_config()
  store.save_model(str(tmp_path / "run"), config, nnx.state(create_model(config)))
  stored = store.load_config(str(tmp_path / "run"))
  stored.trainer = "m2cp"
  store.save_config(stored, str(tmp_path / "run"))
  with pytest.raises(config_lib.ConfigError, match=r"is a config.trainer='m2cp' run: this mode "
                     r"reads unified-decoder \(config.trainer='lm'\) checkpoints only"):
    store.resolve_config(store.locate(str(tmp_path / "run")), None, ())
