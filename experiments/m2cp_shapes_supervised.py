"""Supervised-only baseline for M2CP on data/shapes3d: the same model, CE on labelled rows only.

  python -m ernie5_jax.main --config=experiments/m2cp_shapes_supervised.py:frac=0.02,seed=0 \
      --workdir=/tmp/sup

Same arg as experiments/m2cp_shapes.py; every unlabelled loss has weight 0, so no
unlabelled rows are read (loss.consistency_weight = m2cp_weight = pseudo_ce_weight =
class_balance_weight = 0).
"""

import os
import runpy

_M2CP = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "m2cp_shapes.py"))


def get_config(arg: str = ""):
  """Returns the supervised-only config at the label fraction / seed given in arg."""
  config = _M2CP["get_config"](arg)
  config.loss.consistency_weight = 0.0
  config.loss.m2cp_weight = 0.0
  config.loss.pseudo_ce_weight = 0.0
  config.loss.class_balance_weight = 0.0
  return config
