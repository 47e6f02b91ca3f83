"""Elastic continued training from an imported ERNIE 4.5 checkpoint (docs/interop.md).

  python -m ernie5_jax.main --mode=import \
      --hf_checkpoint=tests/interop/testdata/ernie45_moe_tiny --workdir=workdirs/ernie45
  python -m ernie5_jax.main --config=experiments/ernie45_continue.py:init_from=workdirs/ernie45 \
      --workdir=workdirs/ernie45_elastic
  python -m ernie5_jax.main --config=experiments/ernie45_continue.py:init_from=/tmp/ernie45,steps=2000,data=tfds:stdlib_text \
      --workdir=/tmp/ernie45_cpt

The model is the imported one (its stored config.json, so train.init_from's shapes match);
the run trains the elastic family (depth, routed-expert prefix, top-k) with the full model.
data: "synthetic" (no files; ids drawn from the model's vocabulary) or a text source
("tfds:NAME" / "seqio:NAME") tokenized with the checkpoint's own SentencePiece model
(data.text_model, set by the import when the checkpoint has a tokenizer.model).
"""

from ernie5_jax import config as config_lib
from ernie5_jax import store


def get_config(arg: str = ""):
  """The imported model's config, set up for a short elastic continued-training run."""
  args = config_lib.parse_arg(arg, init_from="workdirs/ernie45", steps=4, data="synthetic",
                              lr=1e-4)
  config = store.load_config(args.init_from)
  config.train.update(init_from=args.init_from, num_steps=args.steps,
                      log_every=max(1, min(25, args.steps // 2)),
                      checkpoint_every=min(500, args.steps))
  config.optimizer.update(learning_rate=args.lr, warmup_steps=min(100, args.steps // 4),
                          decay_fraction=0.2)
  config.elastic.enabled = True
  config.data.update(source=args.data, seq_len=32, global_batch_size=4)
  # The eval job: one batch per sub-model, no decode timing (each sub-model would compile).
  config.eval.update(num_batches=1, decode_tokens=0)
  return config
