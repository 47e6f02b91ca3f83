"""M2CP on the embedded procedural shapes (data/shapes3d), semi-supervised.

  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py --workdir=/tmp/m2cp
  python -m ernie5_jax.main --config=experiments/m2cp_shapes.py:frac=0.05,seed=1 \
      --workdir=/tmp/m2cp_f05_s1
  python benchmarks/m2cp_table.py   # the seeds x fractions x {m2cp, supervised} table

arg: comma-separated key=value; frac (label fraction, default 0.02), seed (parameter init,
batch order and labelled split; default 0), steps (default config.train.num_steps).
The first run builds data/shapes3d into config.data.data_dir (~20-30 s), then reuses it.
"""

from ernie5_jax.m2cp import config as config_lib


def parse_arg(arg: str) -> dict[str, str]:
  """'frac=0.02,seed=1' -> {'frac': '0.02', 'seed': '1'}; rejects unknown keys."""
  known = ("frac", "seed", "steps")
  out = {}
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in known:
      raise ValueError(f"config arg item {item!r} is not accepted: expected key=value with "
                       f"key in {known}")
    out[key] = value
  return out


def get_config(arg: str = ""):
  """Returns the M2CP shapes3d experiment at the label fraction / seed given in arg."""
  args = parse_arg(arg)
  config = config_lib.default_config()
  config.data.label_fraction = float(args.get("frac", 0.02))
  config.seed = int(args.get("seed", 0))
  config.data.split_seed = config.seed
  if "steps" in args:
    config.train.num_steps = int(args["steps"])
  return config
