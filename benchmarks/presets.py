"""Text-only model presets of the framework comparison (issue #15), shared by the benchmarks.

Each preset is an ERNIE-4.5-shaped MoE language model that `transformers`'
`Ernie4_5_MoeForCausalLM` can hold exactly (interop/ernie45.hf_config): text only, no MTP
module, no audio heads, no sqrt(d_model) embedding scale, softmax routing, float32. The
synthetic token source feeds it one modality.

  small:  d 256, 4 layers (1 dense), 16 experts x 256, top-2, 1 shared, vocab 8192,
          seq 256, batch 8
  medium: d 512, 6 layers (1 dense), 64 experts x 256, top-4, 1 shared, vocab 32000,
          seq 512, batch 4

Both run their layers unrolled (config.model.scan_layers=False), the faster layout on CPU.
"""

from __future__ import annotations

import ml_collections

from ernie5_jax import config as config_lib

PRESETS: dict[str, dict[str, int]] = {
    "small": dict(d_model=256, num_layers=4, num_dense_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=64, dense_hidden=1024, num_experts=16, expert_hidden=256, top_k=2,
                  num_shared_experts=1, vocab_size=8192, seq_len=256, batch=8),
    "medium": dict(d_model=512, num_layers=6, num_dense_layers=1, num_heads=8, num_kv_heads=2,
                   head_dim=64, dense_hidden=2048, num_experts=64, expert_hidden=256, top_k=4,
                   num_shared_experts=1, vocab_size=32000, seq_len=512, batch=4),
}


def preset_config(name: str) -> ml_collections.ConfigDict:
  """The validated experiment config of preset `name` (module docstring)."""
  if name not in PRESETS:
    raise ValueError(f"preset={name!r} is not accepted: expected one of {tuple(PRESETS)}")
  spec = dict(PRESETS[name])
  config = config_lib.default_config()
  config.data.source = "synthetic"
  config.data.num_modalities = 1
  config.data.seq_len = spec.pop("seq_len")
  config.data.global_batch_size = spec.pop("batch")
  config.objective.mtp_depth = 0
  m = config.model
  m.audio_levels = 1
  config.objective.audio_level_weights = ()
  m.embed_scale = False
  m.rope_sections = (spec["head_dim"] // 2, 0, 0)  # text only: every pair rotates with t
  # Per-layer weights, not a scan over stacked ones: on CPU a scan copies each layer's
  # weights out of the stack in every pass (as generate/decode.py's unroll_layers says).
  # Same process, alternating rounds: small 545-569 -> 521-546 ms, medium 3,097-3,435 ->
  # 2,897-3,351 ms per step; compiles unchanged (docs/results.md, fifth round).
  m.scan_layers = False
  for field, value in spec.items():
    m[field] = value
  config_lib.validate(config)
  return config
