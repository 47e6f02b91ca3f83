"""M2CP on the embedded procedural shapes (data/shapes3d), semi-supervised.

  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py --workdir=/tmp/m2cp
  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py:frac=0.05,seed=1 \
      --workdir=/tmp/m2cp_f05_s1
  python benchmarks/m2cp_table.py   # the seeds x fractions x {m2cp, supervised} table

arg: comma-separated key=value; frac (label fraction, default 0.02), seed (parameter init,
batch order and labelled split; default 0), steps (default config.train.num_steps).
The first run builds data/shapes3d into config.data.data_dir (~20-30 s), then reuses it.
"""

from ernie5_jax import config as base_config
from ernie5_jax.m2cp import config as config_lib


def get_config(arg: str = ""):
  """Returns the M2CP shapes3d experiment at the label fraction / seed given in arg."""
  args = base_config.parse_arg(arg, frac=0.02, seed=0, steps=0)
  config = config_lib.default_config()
  config.data.label_fraction = args.frac
  config.seed = config.data.split_seed = args.seed
  if args.steps:
    config.train.num_steps = args.steps
  return config
