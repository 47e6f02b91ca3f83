"""M2CP on the embedded procedural shapes (data/shapes3d), semi-supervised.

  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py --workdir=/tmp/m2cp
  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py:frac=0.05,seed=1 \
      --workdir=/tmp/m2cp_f05_s1
  python benchmarks/m2cp_table.py   # the seeds x fractions x {m2cp, supervised} table

arg: comma-separated key=value; frac (label fraction, default 0.02), seed (parameter init,
batch order and labelled split; default 0), steps (default config.train.num_steps), drop
(one of this project's additions to the published recipe turned off, the ablation rows of
docs/m2cp.md: "pseudo_ce" FixMatch's pseudo-label CE, "alignment" distribution alignment,
"balance" the class-balance term; default "": none).
The first run builds data/shapes3d into config.data.data_dir (~20-30 s), then reuses it.
"""

from ernie5_jax import config as base_config
from ernie5_jax.m2cp import config as config_lib


# This project's additions to M2CP, each as the loss fields that turn it off.
ADDITIONS = {"": {}, "pseudo_ce": {"pseudo_ce_weight": 0.0},
             "alignment": {"distribution_alignment": False},
             "balance": {"class_balance_weight": 0.0}}


def get_config(arg: str = ""):
  """Returns the M2CP shapes3d experiment at the label fraction / seed given in arg."""
  args = base_config.parse_arg(arg, frac=0.02, seed=0, steps=0, drop="")
  config = config_lib.default_config()
  if args.drop not in ADDITIONS:
    raise config_lib.ConfigError(f"drop={args.drop!r} is not accepted: expected one of "
                                 f"{tuple(ADDITIONS)}")
  config.loss.update(ADDITIONS[args.drop])
  config.data.label_fraction = args.frac
  config.seed = config.data.split_seed = args.seed
  if args.steps:
    config.train.num_steps = args.steps
  return config
