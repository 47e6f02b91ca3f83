"""M2CP configs (ernie5_jax/m2cp/config.py, experiments/m2cp_*.py): the published recipe,
the ablation arg, the optimizer fields and their errors."""

import os
import runpy

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ernie5_jax.m2cp import config as config_lib
from ernie5_jax.m2cp import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _experiment(name, arg=""):
  return runpy.run_path(os.path.join(REPO, "experiments", name))["get_config"](arg)


def test_paper_recipe_is_the_published_one_on_the_same_splits():
  paper = _experiment("m2cp_paper.py", "frac=0.05,seed=2")
  ours = _experiment("m2cp_shapes.py", "frac=0.05,seed=2")
  config_lib.validate(paper)
  lo, o = paper.loss, paper.optimizer
  assert (lo.consistency_temperature, lo.consistency_weight) == (0.5, 6.0)  # 2 x sum of 3
  assert (lo.m2cp_temperature, lo.m2cp_weight) == (0.5, 9.0)
  assert lo.pseudo_ce_weight == 0 and not lo.distribution_alignment
  assert lo.class_balance_weight == 0
  assert (o.name, o.schedule, o.learning_rate, o.momentum, o.weight_decay) == (
      "sgd", "constant", 0.01, 0.9, 1e-3)
  for field in ("seed", "data.split_seed", "data.label_fraction", "train.num_steps",
                "model.embed_dim"):
    get = lambda c: c[field] if "." not in field else c[field.split(".")[0]][field.split(".")[1]]
    assert get(paper) == get(ours), field


def test_ablation_arg_drops_one_addition():
  assert _experiment("m2cp_shapes.py", "drop=pseudo_ce").loss.pseudo_ce_weight == 0
  assert not _experiment("m2cp_shapes.py", "drop=alignment").loss.distribution_alignment
  dropped = _experiment("m2cp_shapes.py", "drop=balance").loss
  assert dropped.class_balance_weight == 0 and dropped.pseudo_ce_weight == 1
  with pytest.raises(config_lib.ConfigError, match=r"drop='fixmatch' is not accepted"):
    _experiment("m2cp_shapes.py", "drop=fixmatch")


def test_sgd_is_torch_sgd_with_l2_decay():
  config = _experiment("m2cp_paper.py")
  tx, schedule = train_lib.create_optimizer(config)
  assert float(schedule(500)) == pytest.approx(0.01)
  p, g = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.5])
  state = tx.init(p)
  buf, want = np.zeros(2), np.asarray(p)
  for _ in range(2):  # torch.optim.SGD: d = g + wd p; buf = m buf + d; p -= lr buf
    buf = 0.9 * buf + (np.asarray(g) + 1e-3 * want)
    want = want - 0.01 * buf
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(np.asarray(p), want, rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("name", "lamb", r"config.optimizer.name='lamb' is not accepted: expected one of "
                     r"\('adamw', 'sgd'\)"),
    ("schedule", "step", r"config.optimizer.schedule='step' is not accepted"),
    ("momentum", 1.0, r"config.optimizer.momentum=1.0 is not accepted: expected a value in"),
])
def test_optimizer_errors_name_the_field(field, value, message):
  config = config_lib.default_config()
  config.optimizer[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
