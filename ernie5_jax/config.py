"""The one declaration of every experiment field, and its validation.

Experiment files (`experiments/*.py`) start from `default_config()` and override
what they change; each field is declared and documented here, once. `validate`
runs before anything is compiled and raises `ConfigError` naming the field, the
value and what is accepted.
"""

from __future__ import annotations

from typing import Any

import ml_collections

MOE_DISPATCH_BACKENDS = ("auto", "gather", "ragged_dot", "capacity", "pallas")
ATTENTION_BACKENDS = ("auto", "xla", "pallas")
ROUTER_SCORES = ("softmax", "sigmoid")
ELASTIC_SCHEMES = ("prefix", "paper")
DTYPES = ("float32", "bfloat16")
ROLLOUT_DTYPES = DTYPES + ("float8_e4m3fn",)  # float8: per-tensor scaled weights (rl/rollout.py)
# data.source: also "tfds:NAME[/CONFIG]" or "seqio:NAME" (text only, seqio_tasks.py).
DATA_SOURCES = ("synthetic", "digits_multimodal", "digits_sft")
TEXT_SOURCE_PREFIXES = ("tfds:", "seqio:")
LOSS_WEIGHTINGS = ("posterior", "uniform")
# RL post-training task families (ernie5_jax/input_pipeline/verifiable.py) and losses (rl/objective.py).
RL_FAMILIES = ("image_digit", "video_digit", "audio_digit", "image_arithmetic",
               "caption_image")
RL_LOSSES = ("gspo", "token_clip")
# Device-mesh axes, outermost first (ernie5_jax/sharding.py explains each).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
DISTRIBUTED_INIT = ("auto", "always", "never")
# Logical axis name -> mesh axes ("a,b"; "" = replicated): config.mesh.rules. Activations:
# batch, seq, act_embed; parameters: the names model code gives them (model/layers.py param).
DEFAULT_MESH_RULES = {
    "batch": "data,fsdp,expert", "seq": "", "act_embed": "",
    "vocab": "tensor", "embed": "fsdp,expert", "q_heads": "tensor", "kv_heads": "tensor",
    "head_dim": "", "mlp": "tensor", "expert": "expert", "expert_mlp": "tensor", "layers": "",
    "audio_level": "", "audio_vocab": "", "mtp_concat": "", "modality": "",
}
# Task weights of the embedded multimodal data (input_pipeline/sequence.py TASKS + "text");
# text_to_video is on, so that video has a (generation) loss too.
DEFAULT_TASKS = {"caption_to_image": 1.0, "image_to_caption": 1.0, "video_to_text": 1.0,
                 "audio_to_text": 1.0, "text_to_audio": 1.0, "text_to_video": 1.0, "text": 1.0}


class ConfigError(ValueError):
  """A config field holds a value that is not accepted."""


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
  """An experiment's --config=file.py:ARG as typed fields (after big_vision's parse_arg).

  arg is "key=value,key=value"; each key must be one of `defaults`, whose values give the
  type and the default ("frac=0.05,seed=1" with frac=0.02, seed=0 -> frac 0.05, seed 1).
  An unknown key or a value of the wrong type raises ConfigError naming the accepted keys.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ConfigError(f"config arg item {item!r} is not accepted: expected key=value with "
                        f"key in {tuple(defaults)}")
    kind = type(defaults[key])
    try:
      out[key] = value if kind is str else kind(value)
    except ValueError as e:
      raise ConfigError(f"config arg {key}={value!r} is not accepted: expected a "
                        f"{kind.__name__}") from e
  return out


def default_config() -> ml_collections.ConfigDict:
  """Returns the base config; experiment files override fields of it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init and the synthetic examples' content (data.shuffle_seed: their order).

  # --- model: the unified MoE decoder (ernie5_jax/model) ----------------------
  m = c.model = ml_collections.ConfigDict()
  # One vocabulary for all modalities (text, image, audio level-1 codes, specials). With a
  # file-backed data.source it must equal the data's: validate checks it against
  # input_pipeline.multimodal.vocabulary_layout(config.data).vocab_size, from which
  # experiments set it (experiments/tiny.py).
  m.vocab_size = 512
  m.d_model = 128  # Residual-stream width.
  m.num_layers = 2  # Decoder blocks, dense first layers included.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # Key/value heads (grouped-query attention); divides num_heads.
  m.head_dim = 32  # Per-head width (num_heads * head_dim need not equal d_model).
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
  # Storage dtype of the router kernel; "" = model.param_dtype. ERNIE 4.5 keeps its gate in
  # float32 in bf16 checkpoints (the import sets "float32"), so that routing is not rounded.
  m.router_param_dtype = ""
  # MoE dispatch backend: "auto" (ops/backend.py: "pallas" on TPU/GPU, "gather" on CPU),
  # "gather", "ragged_dot", "capacity" (token dropping) or "pallas" (interpret mode on CPU).
  m.moe_dispatch = "auto"
  # Attention backend: "auto" ("pallas" flash attention on TPU/GPU, "xla" on CPU),
  # "xla" or "pallas" (interpret mode on CPU).
  m.attention = "auto"
  m.capacity_factor = 1.25  # Per-expert capacity / (tokens * top_k / experts); "capacity" only.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.tie_embeddings = True  # Output head reuses the token embedding.
  # Multiply looked-up embeddings by sqrt(d_model) (Gemma-style, model/layers.py Embed);
  # imported ERNIE 4.5 checkpoints do not (ernie5_jax/interop/ernie45.py sets False).
  m.embed_scale = True
  m.scan_layers = True  # Stack and scan the MoE blocks (compile time independent of depth).
  m.remat = False  # Rematerialise each block in the backward pass.
  m.dtype = "float32"  # Activation / compute dtype.
  m.param_dtype = "float32"  # Parameter storage dtype.
  # Audio codec levels K the model reads and predicts (next-codec prediction, DESIGN.md): level 1
  # is a vocabulary token; levels 2..K are summed into the input embedding and predicted by the
  # audio heads. 1 = no audio heads. At most the data's codec levels (4 for digits_multimodal).
  m.audio_levels = 4
  m.audio_codebook_size = 128  # Codes per audio level; must equal the data's codec.
  m.audio_head_hidden = 256  # SwiGLU hidden width of each audio head (ernie5_jax/model/heads.py).

  # --- router balancing -----------------------------------------------------
  r = c.router = ml_collections.ConfigDict()
  r.bias_update_rate = 1e-4  # u in bias += u * sign(mean_load - load) (aux-loss-free balancing).
  r.load_balance_weight = 0.0  # Switch-Transformer load-balance loss weight.
  r.z_loss_weight = 0.0  # Router z-loss weight (ST-MoE).

  # --- data -----------------------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  # "synthetic": a deterministic token source (no files; the unit tests' source);
  # "digits_multimodal": the embedded multimodal data (data/digits_multimodal + stdlib_text,
  # built on first use; experiments/tiny.py); "digits_sft": instruction SFT of the RL task
  # families in rl.families (prompt + reference answer, loss on the answer only; input_pipeline/sft.py);
  # "tfds:NAME[/CONFIG]" / "seqio:NAME": text only from any TFDS dataset prepared as
  # ArrayRecord or a registered seqio task/mixture.
  d.source = "synthetic"
  d.seq_len = 64  # Tokens per packed example.
  d.global_batch_size = 8  # Examples per optimizer step, summed over processes.
  d.num_modalities = 2  # Modalities the synthetic source interleaves (for per-modality metrics).
  d.shuffle_seed = 0  # Seeds the record order (and multimodal task draws and packing).
  # The fields below are read by the embedded / TFDS / seqio sources only.
  d.data_dir = ""  # TFDS data_dir; "" -> $ERNIE5_DATA_DIR or ~/.cache/ernie5_jax/data.
  d.dataset = "digits_multimodal"  # Embedded multimodal TFDS dataset ("name[/config]").
  # Relative weight of each document kind: digits tasks and plain stdlib_text ("text").
  d.tasks = ml_collections.ConfigDict(DEFAULT_TASKS)
  d.image_scales = (1, 2, 4)  # Image-tokenizer scales put in the stream (a prefix of 1, 2, 4, 8).
  d.video_scales = (1, 2, 4)  # The same, per video frame.
  d.video_frames = 2  # Frames kept per clip (evenly spaced).
  d.skip_corrupt = False  # Skip (and count) unreadable records instead of raising.
  # SentencePiece model of the text sources ("tfds:" / "seqio:"; the embedded multimodal data
  # keeps its own vocabulary): "" = the committed stdlib tokenizer; an imported checkpoint's
  # tokenizer.model (--mode=import sets it), whose pieces must fit in model.vocab_size.
  d.text_model = ""
  # With skip_corrupt: the run stops (DataError naming the source) once more than this
  # fraction of the records read so far, after the first 100, were skipped.
  d.max_skip_fraction = 0.01
  # Split the training pipeline reads (embedded and tfds:/seqio: sources); the eval job reads
  # eval.split instead.
  d.split = "train"

  # --- objective: next-group-of-tokens (ernie5_jax/train/objective.py) ------
  ob = c.objective = ml_collections.ConfigDict()
  # Multi-token-prediction modules on text (DeepSeek-V3, arXiv 2412.19437 Sec. 2.2); 0 disables.
  ob.mtp_depth = 1
  ob.mtp_weight = 0.3  # lambda of the MTP loss (mean over depths), added to the text loss.
  # Weight of each audio head's loss, levels 2..K (length model.audio_levels - 1).
  ob.audio_level_weights = (1.0, 1.0, 1.0)
  # "posterior": rescale each modality's loss by ema_mean / ema_m (a running estimate of each
  # modality's loss, in the model's non-trainable state); "uniform": no rescaling.
  ob.loss_weighting = "posterior"
  ob.loss_ema_decay = 0.98  # Decay of those running estimates (per step the modality is seen).

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
  # Fine-tuning (SFT, RL): a checkpoint path (as --mode=eval takes) whose model weights start
  # the run when the workdir has no checkpoint yet; the optimizer and the step start fresh.
  # Its model must have this config's shapes. "" = initialise from config.seed.
  t.init_from = ""

  # --- elastic training: one run trains a family of sub-models (ernie5_jax/model/elastic.py) ---
  # ERNIE 5.0 (arXiv 2602.04705): each optimizer step trains the full model and
  # elastic.sub_models sampled sub-models (depth, routed experts, top-k) on the same batch.
  # A sub-model keeps the full value of each axis with the *_prob below, else draws
  # uniformly from that axis's choices; an axis without choices always stays full.
  el = c.elastic = ml_collections.ConfigDict()
  el.enabled = False  # Train the family (experiments turn it on); False: the full model only.
  # Sub-models sampled per step, each a pass over the whole batch after the full model's
  # (train/step.py; a step costs 1 + sub_models passes); the step averages their gradients.
  el.sub_models = 1
  # Which layers / experts a sub-model keeps (docs/elastic.md): "prefix" keeps canonical
  # layers and the expert prefix (export is a slice); "paper" drops random interior layers
  # and a random expert subset (elastic.expert_counts multiples of mesh.expert, as many per
  # expert shard) each step, as the ERNIE 5.0 report does; its export keeps the experts of
  # highest measured load.
  el.scheme = "prefix"
  # Each axis is full with its *_prob, independently, conditioned on the sub-model not being
  # the full model (pass 0 already trains that): model/elastic.py sample_masks.
  el.full_depth_prob = 0.75  # P(all model.num_layers layers), before the conditioning.
  el.full_experts_prob = 0.8  # P(all model.num_experts routed experts), before it.
  el.full_top_k_prob = 0.8  # P(model.top_k experts per token), before it.
  # Depths (layers kept, dense ones included) below model.num_layers, each >= 2 (the first
  # and the last layer are never skipped); () derives round(0.5 L) and round(0.75 L).
  el.depths = ()
  # Routed-expert counts (a prefix of the experts) below model.num_experts, each >=
  # model.top_k; () derives E // 2 and round(0.75 E).
  el.expert_counts = ()
  # Experts per token below model.top_k, each >= 1; () derives ceil(k / 2) and round(0.75 k)
  # ("prefix") or every k in ceil(k / 2)..k - 1 ("paper": k uniform over a range).
  el.top_ks = ()

  # --- mesh: how arrays are laid out over devices (ernie5_jax/sharding.py) ----
  # Axis sizes multiply to the device count; one may be -1 (fill). data: batch split, state
  # replicated; fsdp: batch split, parameters and optimizer state sharded (ZeRO-3); expert:
  # batch split, routed experts sharded, tokens exchanged by all-to-all; tensor: heads, MLP
  # hidden and vocabulary split (keep it inside a host).
  ms = c.mesh = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.expert = 1
  ms.tensor = 1
  # Expert parallelism (mesh.expert > 1): rows each device sends to each expert shard, as a
  # multiple of its balanced share (its tokens * top_k / expert shards); assignments past it
  # are dropped (GShard capacity). 0 = dropless: every buffer can hold all of the device's
  # assignments (exact; mesh.expert times the exchange memory).
  ms.expert_capacity_factor = 0.0
  # Logical axis name -> comma-separated mesh axes ("" = replicated); a mesh axis already used
  # by an earlier dimension of the same array is skipped. mesh.expert > 1 needs the expert
  # rule's axes in the batch rule (tokens are exchanged between the shards of the batch).
  ms.rules = ml_collections.ConfigDict(DEFAULT_MESH_RULES)

  # --- distributed: multi-process start-up (ernie5_jax/distributed.py) --------
  ds = c.distributed = ml_collections.ConfigDict()
  # jax.distributed.initialize before any device is touched: "auto" when the environment
  # asks for it (JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI with more than one task),
  # "always" (multi-host TPU pods: JAX detects the rest), "never".
  ds.initialize = "auto"
  ds.coordinator_address = ""  # "host:port" of process 0; "" -> environment / auto-detect.
  ds.num_processes = 0  # 0 -> environment / auto-detect.
  ds.process_id = -1  # -1 -> environment / auto-detect.

  # --- eval job: python -m ernie5_jax.main --mode=eval --checkpoint=PATH (ernie5_jax/eval/job.py) ---
  ev = c.eval = ml_collections.ConfigDict()
  ev.split = "test"  # Held-out split evaluated (the data source's; data.split is training's).
  # Batches of data.global_batch_size rows evaluated, the same ones for every sub-model
  # (deterministic: the first batches of the split's pipeline with data.shuffle_seed).
  ev.num_batches = 4
  ev.decode_batch_size = 1  # Rows generated together when timing decode tokens/s.
  # New tokens per row in that timing (after a prefill of data.seq_len // 4); 0 skips it
  # (each sub-model compiles its own decode steps: ~10-20 s each for a tiny model on CPU).
  ev.decode_tokens = 32
  # Share of experts (the most frequently chosen) whose overlap between modalities the routing
  # analysis reports as IoU (ERNIE 5.0's analysis uses the top 25%).
  ev.routing_top_fraction = 0.25
  ev.plots = True  # Write PNG plots of the routing analysis (matplotlib) next to its JSON.

  # --- generation: python -m ernie5_jax.main --mode=generate (ernie5_jax/eval/samples.py) ---
  ge = c.generate = ml_collections.ConfigDict()
  ge.temperature = 1.0  # Sampling temperature; 0 = greedy (argmax).
  ge.top_p = 0.9  # Nucleus sampling mass (Holtzman et al. 2019); 1 = no cut.
  ge.samples_per_digit = 3  # Caption->image and text->audio samples per digit 0..9.
  ge.text_tokens = 24  # New tokens per text-continuation prompt.
  ge.seed = 0  # Seeds the sampling and the choice of data-style prompts.

  # --- RL post-training: python -m ernie5_jax.main --mode=rl (ernie5_jax/rl/train.py) ---
  # Starts from train.init_from (an SFT checkpoint); train.checkpoint_every / log_every count
  # iterations. Each iteration: rollouts of every family (rl/rollout.py), rewards
  # (rl/verifiers.py), the unbiased replay buffer (rl/buffer.py), rl.updates optimizer steps.
  rl = c.rl = ml_collections.ConfigDict()
  rl.iterations = 100  # RL iterations (rollout + updates).
  rl.families = RL_FAMILIES  # Verifiable task families trained (input_pipeline/verifiable.py).
  rl.prompts_per_family = 4  # Prompts per family per iteration.
  rl.group_size = 4  # Rollouts per prompt (G); advantages are normalised within a group.
  rl.max_new_tokens = 4  # Response length cap of text families (images: one full image).
  rl.temperature = 1.0  # Rollout sampling temperature.
  rl.top_p = 1.0  # Rollout nucleus mass (1 = the full distribution: unbiased log-probs).
  rl.updates = 2  # Optimizer steps per iteration on its rollouts (pi_old = the rollout policy).
  # "gspo": sequence-level ratio (pi/pi_old)^(1/|y|) clipped to [1 - clip_low, 1 + clip_high]
  # (GSPO, arXiv 2507.18071; their ranges 3e-4 / 4e-4); "token_clip": PPO/GRPO per-token ratio
  # with token_clip_low / token_clip_high (the plain baseline).
  rl.loss = "gspo"
  rl.clip_low = 3e-4
  rl.clip_high = 4e-4
  rl.token_clip_low = 0.2
  rl.token_clip_high = 0.28
  # Rollout router replay: the training forward reuses the expert ids the rollout engine chose.
  rl.router_replay = True
  # The rollout engine's precision (a real inference engine's): the training forward is float32.
  # "float8_e4m3fn": FP8 weights with a per-tensor scale, as ERNIE 5.0 pairs with MISC.
  rl.rollout_dtype = "bfloat16"
  # MISC (ERNIE 5.0): keep a token only when pi_train / pi_infer lies in [alpha, beta].
  rl.misc = True
  rl.misc_alpha = 0.5
  rl.misc_beta = 2.0
  # WPSM (ERNIE 5.0): positive rollouts of a query solved above wpsm_tau (pass rate) with mean
  # token entropy below wpsm_eta get weight 1 - wpsm_a.
  rl.wpsm = True
  rl.wpsm_tau = 0.6  # Below (G - 1) / G: a group of G = 4 with 3 passes counts as solved.
  rl.wpsm_eta = 0.3
  rl.wpsm_a = 0.5
  # Adaptive hints: prefix a fraction p0 * exp(-gamma * t * pass_rate) of the reference answer.
  rl.hints = False
  rl.hint_p0 = 0.5
  rl.hint_gamma = 0.05
  rl.eval_every = 25  # Iterations between held-out evaluations (and the last one).
  rl.eval_prompts = 20  # Held-out prompts per family.
  # Responses sampled per held-out prompt (at rl.temperature / rl.top_p): held-out reward =
  # their mean reward, the policy's expected reward.
  rl.eval_samples = 4
  return c


_CHOICES = {
    "model.moe_dispatch": MOE_DISPATCH_BACKENDS,
    "model.attention": ATTENTION_BACKENDS,
    "model.router_score": ROUTER_SCORES,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "objective.loss_weighting": LOSS_WEIGHTINGS,
    "distributed.initialize": DISTRIBUTED_INIT,
}

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.head_dim", "model.num_experts",
    "model.expert_hidden", "model.top_k", "model.dense_hidden",
    "model.rope_theta", "model.capacity_factor", "model.norm_eps",
    "data.seq_len", "data.global_batch_size", "data.num_modalities", "data.video_frames",
    "model.audio_levels", "model.audio_codebook_size", "model.audio_head_hidden",
    "optimizer.learning_rate", "train.num_steps", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints",
    "rl.iterations", "rl.prompts_per_family", "rl.max_new_tokens", "rl.updates",
    "rl.eval_every", "rl.eval_prompts", "rl.eval_samples", "rl.misc_beta",
)

_NON_NEGATIVE = (
    "model.num_dense_layers", "model.num_shared_experts",
    "router.bias_update_rate", "router.load_balance_weight", "router.z_loss_weight",
    "optimizer.warmup_steps", "optimizer.decay_fraction", "optimizer.min_lr_ratio",
    "optimizer.weight_decay", "optimizer.grad_clip_norm", "train.profile_steps",
    "objective.mtp_depth", "objective.mtp_weight",
    "rl.temperature", "rl.clip_low", "rl.clip_high", "rl.token_clip_low", "rl.token_clip_high",
    "rl.misc_alpha", "rl.hint_gamma",
)


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def fail(path: str, value: Any, accepted: str) -> None:
  """Raises ConfigError naming config.<path>, its value and what is accepted."""
  raise ConfigError(f"config.{path}={value!r} is not accepted: {accepted}")



def check_ranges(config: ml_collections.ConfigDict, *, positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = ()) -> None:
  """Raises ConfigError for the first dotted field not > 0 (positive) or not >= 0."""
  for path in positive:
    if not _get(config, path) > 0:
      fail(path, _get(config, path), "expected a value > 0")
  for path in non_negative:
    if not _get(config, path) >= 0:
      fail(path, _get(config, path), "expected a value >= 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on an invalid or inconsistent config; cheap, no compile."""
  for path, choices in _CHOICES.items():
    if _get(config, path) not in choices:
      fail(path, _get(config, path), f"expected one of {choices}")
  check_ranges(config, positive=_POSITIVE, non_negative=_NON_NEGATIVE)

  m = config.model
  if m.router_param_dtype not in ("",) + DTYPES:
    fail("model.router_param_dtype", m.router_param_dtype,
         f"expected '' (model.param_dtype) or one of {DTYPES}")
  if m.top_k > m.num_experts:
    fail("model.top_k", m.top_k, f"expected <= model.num_experts={m.num_experts}")
  if m.num_heads % m.num_kv_heads:
    fail("model.num_kv_heads", m.num_kv_heads,
          f"expected a divisor of model.num_heads={m.num_heads}")
  if m.head_dim % 2:
    fail("model.head_dim", m.head_dim, "expected an even number (rotary pairs)")
  sections = tuple(m.rope_sections)
  if len(sections) != 3 or any(s < 0 for s in sections) or sum(sections) != m.head_dim // 2:
    fail("model.rope_sections", sections,
          f"expected 3 non-negative ints (t, h, w) summing to model.head_dim // 2 = "
          f"{m.head_dim // 2}")
  if m.num_dense_layers > m.num_layers:
    fail("model.num_dense_layers", m.num_dense_layers,
          f"expected <= model.num_layers={m.num_layers}")
  if config.optimizer.decay_fraction > 1:
    fail("optimizer.decay_fraction", config.optimizer.decay_fraction, "expected <= 1")
  if config.optimizer.warmup_steps + config.optimizer.decay_fraction * config.train.num_steps > \
      config.train.num_steps:
    fail("optimizer.warmup_steps", config.optimizer.warmup_steps,
          f"expected warmup + decay_fraction * train.num_steps <= train.num_steps="
          f"{config.train.num_steps}")
  if config.optimizer.min_lr_ratio > 1:
    fail("optimizer.min_lr_ratio", config.optimizer.min_lr_ratio, "expected <= 1")
  if config.data.seq_len < 2:
    fail("data.seq_len", config.data.seq_len, "expected >= 2 (an input and a target token)")
  if not 0 <= config.data.max_skip_fraction <= 1:
    fail("data.max_skip_fraction", config.data.max_skip_fraction, "expected 0 <= fraction <= 1")
  if config.data.source == "synthetic" and config.data.num_modalities > 2:
    fail("data.num_modalities", config.data.num_modalities,
          "the synthetic source makes 1 (text) or 2 (text, image)")
  source = config.data.source
  if not (source in DATA_SOURCES or (isinstance(source, str) and source.startswith(
      TEXT_SOURCE_PREFIXES) and source.partition(":")[2])):
    fail("data.source", source, f"expected one of {DATA_SOURCES}, 'tfds:NAME[/CONFIG]' or "
          "'seqio:NAME'")
  ob = config.objective
  if not 0 <= ob.loss_ema_decay < 1:
    fail("objective.loss_ema_decay", ob.loss_ema_decay, "expected 0 <= decay < 1")
  weights = tuple(ob.audio_level_weights)
  if len(weights) != m.audio_levels - 1 or any(w < 0 for w in weights):
    fail("objective.audio_level_weights", weights,
          f"expected model.audio_levels - 1 = {m.audio_levels - 1} weights >= 0 (levels 2..K)")
  _check_elastic(config)
  _check_generate(config)
  _check_eval(config)
  _check_rl(config)
  _check_mesh(config)


def mesh_rule_axes(name: str, value: Any) -> tuple[str, ...]:
  """Parses config.mesh.rules.<name> ("data,fsdp"; "" = replicated) into mesh axis names."""
  axes = tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else None
  if axes is None or any(a not in MESH_AXES for a in axes) or len(set(axes)) != len(axes):
    fail(f"mesh.rules.{name}", value, f"expected distinct mesh axes from {MESH_AXES}, "
         "comma-separated, or '' (replicated)")
  return axes


def _check_mesh(config: ml_collections.ConfigDict) -> None:
  """Checks config.mesh sizes, rules and config.distributed; device counts: sharding.make_layout."""
  ms = config.mesh
  sizes = {axis: ms[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, int) or not (size == -1 or size >= 1):
      fail(f"mesh.{axis}", size, "expected an int >= 1, or -1 (fill the remaining devices)")
  if sum(size == -1 for size in sizes.values()) > 1:
    fail("mesh", sizes, "expected at most one axis of size -1")
  if not ms.expert_capacity_factor >= 0:
    fail("mesh.expert_capacity_factor", ms.expert_capacity_factor, "expected >= 0 (0: dropless)")
  for name, value in ms.rules.items():
    mesh_rule_axes(name, value)
  experts = ms.expert
  if experts > 1 and config.model.num_experts % experts:
    fail("mesh.expert", experts,
         f"expected a divisor of model.num_experts={config.model.num_experts}")
  d = config.distributed
  if d.num_processes < 0:
    fail("distributed.num_processes", d.num_processes, "expected >= 0 (0: auto-detect)")
  if d.process_id < -1 or (d.num_processes and d.process_id >= d.num_processes):
    fail("distributed.process_id", d.process_id,
         "expected -1 (auto-detect) or 0..distributed.num_processes - 1")


def _check_eval(config: ml_collections.ConfigDict) -> None:
  """Checks config.eval (the eval job's fields)."""
  ev = config.eval
  check_ranges(config, positive=("eval.num_batches", "eval.decode_batch_size"),
               non_negative=("eval.decode_tokens",))
  if not isinstance(ev.split, str) or not ev.split:
    fail("eval.split", ev.split, "expected a split name of the data source, e.g. 'test'")
  if not 0 < ev.routing_top_fraction <= 1:
    fail("eval.routing_top_fraction", ev.routing_top_fraction, "expected 0 < fraction <= 1")


def _check_elastic(config: ml_collections.ConfigDict) -> None:
  """Checks config.elastic: probabilities, sub-models per step and each axis's choices."""
  el, m = config.elastic, config.model
  for name in ("full_depth_prob", "full_experts_prob", "full_top_k_prob"):
    if not 0 <= el[name] <= 1:
      fail(f"elastic.{name}", el[name], "expected a probability in [0, 1]")
  if not isinstance(el.sub_models, int) or el.sub_models < 1:
    fail("elastic.sub_models", el.sub_models, "expected an int >= 1 (sub-models per step)")
  if el.scheme not in ELASTIC_SCHEMES:
    fail("elastic.scheme", el.scheme, f"expected one of {ELASTIC_SCHEMES}")
  if el.enabled and min(el.full_depth_prob, el.full_experts_prob, el.full_top_k_prob) == 1:
    fail("elastic.full_*_prob", (el.full_depth_prob, el.full_experts_prob, el.full_top_k_prob),
         "expected at least one below 1 (a sampled sub-model is never the full model)")
  shards = max(config.mesh.expert, 1)
  if el.scheme == "paper" and any(e % shards for e in el.expert_counts):
    fail("elastic.expert_counts", tuple(el.expert_counts),
         f"expected multiples of mesh.expert={shards} (scheme 'paper' keeps as many experts "
         "on every expert shard)")
  min_depth = min(2, m.num_layers)
  for name, low, high, what in (
      ("depths", min_depth, m.num_layers - 1, "the first and last layers are always kept"),
      ("expert_counts", m.top_k, m.num_experts - 1, "each >= model.top_k"),
      ("top_ks", 1, m.top_k - 1, "below model.top_k")):
    values = tuple(el[name])
    if (any(not isinstance(v, int) or not low <= v <= high for v in values)
        or len(set(values)) != len(values)):
      fail(f"elastic.{name}", values,
           f"expected distinct ints in {low}..{high} ({what}), or () to derive them")


def _check_rl(config: ml_collections.ConfigDict) -> None:
  """Checks config.rl: families, loss, group size, clip ranges, MISC / WPSM / hint values."""
  rl = config.rl
  families = tuple(rl.families)
  if not families or any(f not in RL_FAMILIES for f in families) or len(set(families)) != len(
      families):
    fail("rl.families", families, f"expected distinct names from {RL_FAMILIES}")
  if rl.loss not in RL_LOSSES:
    fail("rl.loss", rl.loss, f"expected one of {RL_LOSSES}")
  if not isinstance(rl.group_size, int) or rl.group_size < 2:
    fail("rl.group_size", rl.group_size, "expected an int >= 2 (advantages are normalised "
         "within a group)")
  if rl.rollout_dtype not in ROLLOUT_DTYPES:
    fail("rl.rollout_dtype", rl.rollout_dtype, f"expected one of {ROLLOUT_DTYPES}")
  for name in ("clip_low", "token_clip_low"):
    if not rl[name] < 1:
      fail(f"rl.{name}", rl[name], "expected < 1 (the ratio's lower bound is 1 - it)")
  if not rl.misc_alpha < 1 < rl.misc_beta:
    fail("rl.misc_alpha", (rl.misc_alpha, rl.misc_beta),
         "expected misc_alpha < 1 < misc_beta (the kept band of pi_train / pi_infer)")
  for name in ("wpsm_tau", "wpsm_a", "hint_p0"):
    if not 0 <= rl[name] <= 1:
      fail(f"rl.{name}", rl[name], "expected a value in [0, 1]")
  if not 0 < rl.top_p <= 1:
    fail("rl.top_p", rl.top_p, "expected 0 < top_p <= 1")
  if rl.wpsm and isinstance(rl.group_size, int) and rl.wpsm_tau >= (
      rl.group_size - 1) / rl.group_size:
    fail("rl.wpsm_tau", rl.wpsm_tau,
         f"expected < (group_size - 1) / group_size = {(rl.group_size - 1) / rl.group_size:.3g}"
         ": WPSM needs a pass rate above tau and a rollout above its group's mean reward, so "
         "a higher tau never applies")


def _check_generate(config: ml_collections.ConfigDict) -> None:
  """Checks config.generate's sampling parameters and counts."""
  ge = config.generate
  if not ge.temperature >= 0:
    fail("generate.temperature", ge.temperature, "expected >= 0 (0 = greedy)")
  if not 0 < ge.top_p <= 1:
    fail("generate.top_p", ge.top_p, "expected 0 < top_p <= 1")
  for name in ("samples_per_digit", "text_tokens"):
    if not isinstance(ge[name], int) or ge[name] < 1:
      fail(f"generate.{name}", ge[name], "expected an int >= 1")


def to_json(config: ml_collections.ConfigDict) -> str:
  """The config as JSON text (saved next to checkpoints and exported sub-models)."""
  return config.to_json(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of to_json: JSON lists come back as the tuples the config fields hold."""
  import json  # pylint: disable=g-import-not-at-top

  def tuples(value: Any) -> Any:
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  return ml_collections.ConfigDict(tuples(json.loads(text)))
