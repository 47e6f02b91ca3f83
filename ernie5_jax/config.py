"""The one declaration of every experiment field, and its validation.

Experiment files (`experiments/*.py`) start from `default_config()` and override
what they change; each field is declared and documented here, once. `validate`
runs before anything is compiled and raises `ConfigError` naming the field, the
value and what is accepted.
"""

from __future__ import annotations

from typing import Any

import ml_collections

MOE_DISPATCH_BACKENDS = ("auto", "gather", "ragged_dot", "capacity")
ROUTER_SCORES = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("synthetic",)


class ConfigError(ValueError):
  """A config field holds a value that is not accepted."""


def default_config() -> ml_collections.ConfigDict:
  """Returns the base config; experiment files override fields of it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init and the synthetic examples' content (data.shuffle_seed: their order).

  # --- model: the unified MoE decoder (ernie5_jax/model) ----------------------
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 512  # One vocabulary for all modalities (text, image, audio codes).
  m.d_model = 128  # Residual-stream width.
  m.num_layers = 2  # Decoder blocks, dense first layers included.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # Key/value heads (grouped-query attention); divides num_heads.
  m.head_dim = 32  # Per-head width.
  m.rope_theta = 10_000.0  # Uni-RoPE base frequency.
  # Rotary frequency pairs given to the (t, h, w) position axes; sums to head_dim // 2.
  m.rope_sections = (8, 4, 4)
  m.num_dense_layers = 0  # First layers that use a dense SwiGLU MLP instead of MoE.
  m.dense_hidden = 512  # Hidden width of those dense MLPs.
  m.num_experts = 8  # Routed experts per MoE layer.
  m.num_shared_experts = 0  # Always-on experts per MoE layer (each expert_hidden wide).
  m.expert_hidden = 64  # Hidden width of one fine-grained SwiGLU expert.
  m.top_k = 2  # Experts chosen per token.
  m.router_score = "softmax"  # Router score function: "softmax" or "sigmoid".
  m.moe_dispatch = "auto"  # "auto" (fastest for the platform), "gather", "ragged_dot", "capacity".
  m.capacity_factor = 1.25  # Per-expert capacity / (tokens * top_k / experts); "capacity" only.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.tie_embeddings = True  # Output head reuses the token embedding.
  m.scan_layers = True  # Stack and scan the MoE blocks (compile time independent of depth).
  m.remat = False  # Rematerialise each block in the backward pass.
  m.dtype = "float32"  # Activation / compute dtype.
  m.param_dtype = "float32"  # Parameter storage dtype.

  # --- router balancing -----------------------------------------------------
  r = c.router = ml_collections.ConfigDict()
  r.bias_update_rate = 1e-4  # u in bias += u * sign(mean_load - load) (aux-loss-free balancing).
  r.load_balance_weight = 0.0  # Switch-Transformer load-balance loss weight.
  r.z_loss_weight = 0.0  # Router z-loss weight (ST-MoE).

  # --- data -----------------------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.source = "synthetic"  # Only "synthetic" for now: a deterministic token source.
  d.seq_len = 64  # Tokens per packed example.
  d.global_batch_size = 8  # Examples per optimizer step, summed over processes.
  d.num_modalities = 2  # Modalities the synthetic source interleaves (for per-modality metrics).
  d.shuffle_seed = 0  # Seeds the synthetic source's record order.

  # --- optimizer (optax AdamW, warmup-stable-decay) ------------------------
  o = c.optimizer = ml_collections.ConfigDict()
  o.learning_rate = 3e-3  # Peak learning rate.
  o.warmup_steps = 20  # Linear warmup from 0.
  o.decay_fraction = 0.2  # Final fraction of train.num_steps spent decaying to min_lr_ratio.
  o.min_lr_ratio = 0.1  # Final learning rate / peak.
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1  # Decoupled weight decay (not applied to norms or router bias).
  o.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.

  # --- training loop --------------------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 200  # Optimizer steps.
  t.log_every = 10  # Steps between metric writes.
  t.checkpoint_every = 50  # Steps between checkpoints (the last step always saves).
  t.keep_checkpoints = 3  # Checkpoints kept on disk.
  t.async_checkpoints = True  # Save in the background (orbax async).
  t.profile_steps = 0  # Steps to trace with the profiler after warm-up; 0 disables.
  return c


_CHOICES = {
    "model.moe_dispatch": MOE_DISPATCH_BACKENDS,
    "model.router_score": ROUTER_SCORES,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "data.source": DATA_SOURCES,
}

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.head_dim", "model.num_experts",
    "model.expert_hidden", "model.top_k", "model.dense_hidden",
    "model.rope_theta", "model.capacity_factor", "model.norm_eps",
    "data.seq_len", "data.global_batch_size", "data.num_modalities",
    "optimizer.learning_rate", "train.num_steps", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints",
)

_NON_NEGATIVE = (
    "model.num_dense_layers", "model.num_shared_experts",
    "router.bias_update_rate", "router.load_balance_weight", "router.z_loss_weight",
    "optimizer.warmup_steps", "optimizer.decay_fraction", "optimizer.min_lr_ratio",
    "optimizer.weight_decay", "optimizer.grad_clip_norm", "train.profile_steps",
)


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _fail(path: str, value: Any, accepted: str) -> None:
  raise ConfigError(f"config.{path}={value!r} is not accepted: {accepted}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on an invalid or inconsistent config; cheap, no compile."""
  for path, choices in _CHOICES.items():
    if _get(config, path) not in choices:
      _fail(path, _get(config, path), f"expected one of {choices}")
  for path in _POSITIVE:
    if not _get(config, path) > 0:
      _fail(path, _get(config, path), "expected a value > 0")
  for path in _NON_NEGATIVE:
    if not _get(config, path) >= 0:
      _fail(path, _get(config, path), "expected a value >= 0")

  m = config.model
  if m.top_k > m.num_experts:
    _fail("model.top_k", m.top_k, f"expected <= model.num_experts={m.num_experts}")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", m.num_kv_heads,
          f"expected a divisor of model.num_heads={m.num_heads}")
  if m.num_heads * m.head_dim != m.d_model:
    _fail("model.head_dim", m.head_dim,
          f"expected model.num_heads * model.head_dim == model.d_model "
          f"({m.num_heads} * {m.head_dim} != {m.d_model})")
  if m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "expected an even number (rotary pairs)")
  sections = tuple(m.rope_sections)
  if len(sections) != 3 or any(s < 0 for s in sections) or sum(sections) != m.head_dim // 2:
    _fail("model.rope_sections", sections,
          f"expected 3 non-negative ints (t, h, w) summing to model.head_dim // 2 = "
          f"{m.head_dim // 2}")
  if m.num_dense_layers > m.num_layers:
    _fail("model.num_dense_layers", m.num_dense_layers,
          f"expected <= model.num_layers={m.num_layers}")
  if config.optimizer.decay_fraction > 1:
    _fail("optimizer.decay_fraction", config.optimizer.decay_fraction, "expected <= 1")
  if config.optimizer.warmup_steps + config.optimizer.decay_fraction * config.train.num_steps > \
      config.train.num_steps:
    _fail("optimizer.warmup_steps", config.optimizer.warmup_steps,
          f"expected warmup + decay_fraction * train.num_steps <= train.num_steps="
          f"{config.train.num_steps}")
  if config.optimizer.min_lr_ratio > 1:
    _fail("optimizer.min_lr_ratio", config.optimizer.min_lr_ratio, "expected <= 1")
  if config.data.source == "synthetic" and config.data.num_modalities > 2:
    _fail("data.num_modalities", config.data.num_modalities,
          "the synthetic source makes 1 (text) or 2 (text, image)")
