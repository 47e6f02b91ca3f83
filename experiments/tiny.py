"""Tiny unified MoE decoder on synthetic tokens: trains on a laptop CPU in minutes.

  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=20 --config.model.top_k=1
"""

from ernie5_jax import config as config_lib


def get_config():
  """Returns the tiny experiment: 3 layers (1 dense + 2 MoE), 8 experts, top-2."""
  config = config_lib.default_config()
  config.model.num_layers = 3
  config.model.num_dense_layers = 1
  config.model.num_shared_experts = 1
  config.train.num_steps = 200
  return config
