"""Tiny unified MoE decoder on the embedded multimodal data: trains on a 2-core CPU in minutes.

  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny_mm
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=20 --config.model.top_k=1
  python -m ernie5_jax.main --config=experiments/tiny.py:synthetic --workdir=/tmp/tiny_syn

The first run builds data/digits_multimodal and stdlib_text and fits the image/audio
tokenizers into config.data.data_dir ("" -> $ERNIE5_DATA_DIR or ~/.cache/ernie5_jax/data;
~10 s), then reuses them. model.vocab_size and the audio codec fields are set here from the
data's vocabulary layout (computed without building anything); validate() rejects an
override that disagrees with the data.
"""

from ernie5_jax import config as config_lib


def get_config(arg: str = "digits_multimodal"):
  """Returns the tiny experiment: 3 layers (1 dense + 2 MoE), 8 experts, top-2, on `arg` data."""
  config = config_lib.default_config()
  config.model.num_layers = 3
  config.model.num_dense_layers = 1
  config.model.num_shared_experts = 1
  config.train.num_steps = 300
  config.train.log_every = 25
  config.data.source = arg
  if arg == "synthetic":
    config.train.num_steps = 200
    return config
  # pylint: disable-next=g-import-not-at-top
  from ernie5_jax.input_pipeline.multimodal import sync_vocabulary
  sync_vocabulary(config)  # The model's vocabulary and audio codec are the data's.
  config.data.seq_len = 128  # A digits document is 30-60 positions: 2-4 per row.
  config.data.global_batch_size = 8
  return config
