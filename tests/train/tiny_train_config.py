"""The trainer tests' one tiny config, so that few distinct shapes compile."""

from ernie5_jax import config as config_lib

# d_model 32, 1 dense + 1 MoE layer, 4 experts, seq 16, batch 4: the tests' only model shape.
TINY_MODEL = dict(vocab_size=128, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                  rope_sections=(4, 2, 2), num_layers=2, num_dense_layers=1, num_experts=4,
                  num_shared_experts=0, expert_hidden=16, dense_hidden=64, top_k=2)


def make_tiny_config(**train):
  """The tiny test config; keyword arguments override config.train fields."""
  config = config_lib.default_config()
  config.model.update(TINY_MODEL)
  config.data.update(seq_len=16, global_batch_size=4)
  # The plain next-token objective that test_step checks against a naive CE (the full
  # objective is tested in test_objective.py and test_multimodal_train.py).
  config.objective.update(mtp_depth=0, loss_weighting="uniform")
  config.optimizer.warmup_steps = 2
  config.train.update(num_steps=8, log_every=2, checkpoint_every=4, async_checkpoints=True)
  config.train.update(train)
  config_lib.validate(config)
  return config
