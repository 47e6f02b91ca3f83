"""M2CP as published: the authors' recipe on the embedded shapes (data/shapes3d).

  python -m ernie5_jax.main --config=experiments/m2cp_paper.py:frac=0.02,seed=0 \
      --workdir=/tmp/m2cp_paper_f0.02_s0
  python benchmarks/m2cp_table.py --methods=m2cp_paper --fractions=0.02

The same data, splits, seeds, encoders and step count as experiments/m2cp_shapes.py (this
project's recipe); the losses and optimizer are those of the authors' released code
(AutoAILab/M2CP-Learning), as read for issue #19:
- NT-Xent between each modality pair, T = 0.5, weight 2 on the SUM over the 3 pairs
  (loss.consistency_weight = 6 on this project's mean over pairs);
- the prototype (M2CP) loss at T = 0.5, scaled by 9 exp(-5 (1 - t)^2) (m2cp_weight 9 on
  the same sigmoid ramp-up, t = step / loss.rampup_steps);
- no pseudo-label cross-entropy (FixMatch), no distribution alignment, no class balance, no
  strong augmentation (this project's additions, docs/m2cp.md);
- SGD, lr 0.01 constant, momentum 0.9, weight decay 1e-3, no gradient clipping.
Prototypes: one per class, as the paper maintains them (an EMA of the unit class means of
the labelled and confidently pseudo-labelled rows, m2cp/losses.py). The released code
instead creates learnable prototypes whose optimizer is never stepped, so they stay at
their random initialisation; we follow the paper.
arg: as experiments/m2cp_shapes.py (frac, seed, steps).
"""

import os
import runpy

_SHAPES = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "m2cp_shapes.py"))


def get_config(arg: str = ""):
  """Returns the authors' recipe at the label fraction / seed given in arg."""
  config = _SHAPES["get_config"](arg)
  lo = config.loss
  lo.consistency_temperature = 0.5
  lo.consistency_weight = 2.0 * 3  # 2 x the sum over 3 pairs = 6 x their mean.
  lo.m2cp_temperature = 0.5
  lo.m2cp_weight = 9.0
  lo.pseudo_ce_weight = 0.0
  lo.distribution_alignment = False
  lo.class_balance_weight = 0.0
  config.data.strong_unlabelled = False
  config.data.strong_labelled = False
  o = config.optimizer
  o.name, o.schedule = "sgd", "constant"
  o.learning_rate, o.momentum, o.weight_decay = 0.01, 0.9, 1e-3
  o.warmup_steps, o.grad_clip = 0, 0.0
  return config
