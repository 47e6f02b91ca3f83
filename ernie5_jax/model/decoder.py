"""The unified multimodal MoE decoder, its blocks, and the table of size variants.

Layout: embedding (+ the audio frame's level 2..K code embeddings) -> dense blocks
(config.model.num_dense_layers, dense SwiGLU) -> MoE blocks -> final RMSNorm -> tied or
untied output head. The training heads of the objective (heads.py: MTP modules, audio
heads for codec levels 2..K) read the final hidden state (`hidden_states`) through
`mtp_logits` and `audio_logits`. Each group of blocks is one
`BlockStack`: with config.model.scan_layers its parameters are stacked on a leading
'layers' axis (nnx.vmap at init) and applied with nnx.scan, so compile time does not
grow with depth; otherwise it is a Python loop over the same per-layer modules.

Elastic sub-models (model/elastic.py): `elastic=ElasticMasks` runs a sub-model of the
same parameters in the same compiled program: each layer is wrapped in a `lax.cond` on
its layer_keep entry (a skipped layer is the identity and costs nothing, forward and
backward), and each MoE layer masks experts and switches top-k (model/moe.py).

Routing record / replay (RL post-training, issue 8): aux["expert_ids"] [L_moe, batch, seq,
top_k] int32 holds the expert ids every MoE layer used (-1 in a layer an elastic sub-model
skipped, and in slots beyond a smaller elastic top-k). `routing_replay=` of that shape
makes each MoE layer route with the given ids (its slice is threaded through the layer
scan); the combine weights are recomputed from the live router scores at those ids
(model/router.py), so the router still gets gradients. Replaying a record of the same
model and inputs reproduces the forward (bit-identical on one backend).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ernie5_jax import sharding
from ernie5_jax.config import ConfigError
from ernie5_jax.model import kv_cache as kv_cache_lib
from ernie5_jax.model import rope
from ernie5_jax.model.attention import Attention
from ernie5_jax.model.elastic import ElasticMasks
from ernie5_jax.model.kv_cache import KVCache, LayerCache
from ernie5_jax.model.heads import NUM_MODALITIES, AudioHeads, LossEMA, MTPModule
from ernie5_jax.model.layers import MLP, Embed, OutputHead, RMSNorm, to_dtype
from ernie5_jax.model.moe import MoE
from ernie5_jax.model.router import update_router_bias

# Size variants (after big_vision's decode_variant): each sets the model fields that
# decide depth, width, experts and top-k. Active parameters ~ attention + dense layers
# + (top_k + shared) experts per MoE layer; "1T-A32" has ~1.0e12 total, ~3.2e10 active.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 rope_sections=(8, 4, 4), num_dense_layers=0, dense_hidden=512,
                 num_experts=8, num_shared_experts=0, expert_hidden=64, top_k=2),
    "S": dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64,
              rope_sections=(16, 8, 8), num_dense_layers=1, dense_hidden=1536,
              num_experts=16, num_shared_experts=1, expert_hidden=256, top_k=2),
    "B": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
              rope_sections=(16, 8, 8), num_dense_layers=1, dense_hidden=3072,
              num_experts=64, num_shared_experts=2, expert_hidden=384, top_k=6),
    "L": dict(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=4, head_dim=64,
              rope_sections=(16, 8, 8), num_dense_layers=2, dense_hidden=4096,
              num_experts=64, num_shared_experts=2, expert_hidden=512, top_k=6),
    "1T-A32": dict(d_model=7168, num_layers=61, num_heads=56, num_kv_heads=8, head_dim=128,
                   rope_sections=(32, 16, 16), num_dense_layers=3, dense_hidden=18432,
                   num_experts=384, num_shared_experts=1, expert_hidden=2048, top_k=8),
}


def create_model(config: ml_collections.ConfigDict) -> "Decoder":
  """The decoder of a whole config (config.model, MTP depth), parameters drawn from config.seed."""
  return Decoder(config.model, mtp_depth=config.objective.mtp_depth, rngs=nnx.Rngs(config.seed))


def apply_variant(model_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Overwrites model_cfg's size fields with VARIANTS[name]; returns model_cfg."""
  if name not in VARIANTS:
    raise ConfigError(f"model variant={name!r} is not accepted: expected one of "
                      f"{tuple(VARIANTS)}")
  for field, value in VARIANTS[name].items():
    model_cfg[field] = value
  return model_cfg


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h)); ffn dense or MoE."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, moe: bool, rngs: nnx.Rngs):
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = norm()
    self.attn = Attention(d_model=cfg.d_model, num_heads=cfg.num_heads,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          backend=cfg.attention)
    self.ffn_norm = norm()
    if moe:
      self.ffn = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ffn = MLP(cfg.d_model, cfg.dense_hidden, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.moe = moe
    self.dtype = dtype
    self.num_experts = cfg.num_experts
    self.top_k = cfg.top_k

  def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array, *, expert_mask: jax.Array | None = None,
               top_k_index: jax.Array | None = None, top_ks: tuple[int, ...] = (),
               replay_ids: jax.Array | None = None, cache: LayerCache | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [batch, seq, embed] -> (x [batch, seq, embed], per-layer outputs).

    The per-layer outputs are the MoE router statistics ({} when dense) and, with a cache,
    "k" / "v": this layer's cache arrays holding the new positions (Attention.__call__).
    expert_mask / top_k_index / top_ks: the elastic routing of MoE blocks (MoE.__call__);
    replay_ids [batch, seq, top_k] int32: the expert ids to route with (MoE.__call__).
    """
    h, cache = self.attn(self.attn_norm(x), angles, segment_ids, group_ids, cache=cache)
    x = x + h
    if self.moe:
      y, stats = self.ffn(self.ffn_norm(x), expert_mask=expert_mask, top_k_index=top_k_index,
                          top_ks=top_ks, replay_ids=replay_ids)
    else:
      y, stats = self.ffn(self.ffn_norm(x)), {}
    if cache is not None:
      stats = dict(stats, k=cache.k, v=cache.v)
    # The residual stream's layout under an active mesh (sharding.py; no-op otherwise).
    return sharding.constrain((x + y).astype(self.dtype), sharding.ACT_BSD), stats

  def skipped(self, x: jax.Array, cache: LayerCache | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The block skipped by an elastic sub-model: x and the cache unchanged, zero statistics."""
    x = sharding.constrain(x.astype(self.dtype), sharding.ACT_BSD)  # As __call__'s output.
    stats = {} if cache is None else {"k": cache.k, "v": cache.v}
    if not self.moe:
      return x, stats
    zero = jnp.zeros((), jnp.float32)
    batch, seq = x.shape[:2]
    return x, dict(stats, expert_load=jnp.zeros((self.num_experts,), jnp.float32),
                   router_entropy=zero, load_balance_loss=zero, z_loss=zero,
                   expert_ids=jnp.full((batch, seq, self.top_k), -1, jnp.int32),
                   token_entropy=jnp.zeros((batch, seq), jnp.float32))


def _apply_block(block: Block, x, angles, segment_ids, group_ids, expert_mask=None,
                 top_k_index=None, replay_ids=None, cache=None, *, top_ks=()):
  return block(x, angles, segment_ids, group_ids, expert_mask=expert_mask,
               top_k_index=top_k_index, top_ks=top_ks, replay_ids=replay_ids, cache=cache)


class BlockStack(nnx.Module):
  """num_layers blocks of one kind, stacked + scanned or kept as a list + looped."""

  def __init__(self, cfg: ml_collections.ConfigDict, num_layers: int, *, moe: bool,
               rngs: nnx.Rngs):
    self.scan = bool(cfg.scan_layers)
    self.remat = bool(cfg.remat)
    if self.scan:
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(layer_rngs: nnx.Rngs) -> Block:
        return Block(cfg, moe=moe, rngs=layer_rngs)
      self.layers = create(rngs)
    else:
      self.layers = nnx.List([Block(cfg, moe=moe, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array, *, keep: jax.Array | None = None,
               expert_mask: jax.Array | None = None, top_k_index: jax.Array | None = None,
               top_ks: tuple[int, ...] = (), replay: jax.Array | None = None,
               cache: LayerCache | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [batch, seq, embed] -> (x, per-layer outputs stacked on a leading [layers] axis).

    Elastic: keep [layers] bool runs layer i only where True (else the identity, under a
    lax.cond so that nothing is computed); expert_mask / top_k_index / top_ks: Block.
    replay: [layers, batch, seq, top_k] int32 expert ids, layer i's slice to block i.
    cache: this stack's k / v [layers, batch, max_len, kv_heads, head_dim] with the shared
    index and mask; layer i reads and writes its slice ("k" / "v" of the outputs).
    """
    # graph_updates=False: blocks never mutate state in the forward pass, and the simple
    # (pytree) mode also works when the model is merged inside a raw jax.grad / jax.jit.
    apply = functools.partial(_apply_block, top_ks=tuple(top_ks))
    if self.remat:
      apply = nnx.remat(apply, graph_updates=False)

    def layer(block, h, xs_i):
      layer_cache = None if cache is None else dataclasses.replace(cache, k=xs_i["k"],
                                                                   v=xs_i["v"])
      run = lambda h: apply(block, h, angles, segment_ids, group_ids, expert_mask,
                            top_k_index, xs_i.get("replay"), layer_cache)
      if xs_i.get("keep") is None:
        return run(h)
      return jax.lax.cond(xs_i["keep"], run, lambda h: block.skipped(h, layer_cache), h)

    # The per-layer inputs (absent ones left out of the pytree).
    xs = {name: v for name, v in (("keep", keep), ("replay", replay)) if v is not None}
    if cache is not None:
      xs.update(k=cache.k, v=cache.v)
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), graph_updates=False)
      def body(h, block, xs_i):
        return layer(block, h, xs_i)
      return body(x, self.layers, xs)
    per_layer = []
    for i, block in enumerate(self.layers):
      x, stats = layer(block, x, jax.tree.map(lambda v, i=i: v[i], xs))
      per_layer.append(stats)
    return x, jax.tree.map(lambda *s: jnp.stack(s), *per_layer)


def unroll_layers(model: "Decoder") -> "Decoder":
  """A copy of model whose scanned block stacks are per-layer lists of the same weights.

  For decoding on CPU (generate/decode.py): a scan over stacked layers copies each layer's
  weights out of the stack at every step (XLA's CPU backend materialises the slice: ~100 MB
  per MoE layer of benchmarks/presets.py's "medium"), which costs more than one token's
  compute; slicing once here keeps every step's weights in place. The per-layer weights are
  copies (memory: one more set of block weights); their sharding metadata still names the
  stacked 'layers' axis, so this is for single-device use.
  """
  model = nnx.clone(model)
  for stack in (model.dense_layers, model.moe_layers):
    if stack is None or not stack.scan:
      continue
    graphdef, state = nnx.split(stack.layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    stack.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda v, i=i: v[i], state))
                             for i in range(num_layers)])
    stack.scan = False
  return model


class Decoder(nnx.Module):
  """Unified multimodal MoE decoder: (tokens, positions, segments, groups) -> logits, aux."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               mtp_depth: int = 0):
    """model_cfg = config.model; mtp_depth = config.objective.mtp_depth (0: no MTP modules)."""
    cfg = model_cfg
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    if not 0 <= cfg.num_dense_layers <= cfg.num_layers:
      raise ConfigError(f"model.num_dense_layers={cfg.num_dense_layers} is not accepted: "
                        f"expected 0..model.num_layers={cfg.num_layers}")
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs, scale=cfg.get("embed_scale", True))
    self.num_dense_layers = cfg.num_dense_layers
    self.num_moe_layers = cfg.num_layers - cfg.num_dense_layers
    # Each attribute is assigned once: None (static) when the stack or head is absent.
    self.dense_layers = (BlockStack(cfg, self.num_dense_layers, moe=False, rngs=rngs)
                         if self.num_dense_layers else None)
    self.moe_layers = (BlockStack(cfg, self.num_moe_layers, moe=True, rngs=rngs)
                       if self.num_moe_layers else None)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.head = (None if cfg.tie_embeddings else
                 OutputHead(cfg.d_model, cfg.vocab_size, param_dtype=param_dtype, rngs=rngs))
    self.audio = (AudioHeads(cfg.d_model, cfg.audio_levels, cfg.audio_codebook_size,
                             cfg.audio_head_hidden, eps=cfg.norm_eps, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
                  if cfg.audio_levels > 1 else None)
    self.mtp = (nnx.List([MTPModule(cfg.d_model, Block(cfg, moe=False, rngs=rngs),
                                    eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs) for _ in range(mtp_depth)])
                if mtp_depth else None)
    self.loss_ema = LossEMA(jnp.zeros((NUM_MODALITIES,), jnp.float32),
                            out_sharding=("modality",), eager_sharding=False)
    self.head_dim = cfg.head_dim
    self.rope_sections = tuple(cfg.rope_sections)
    self.rope_theta = float(cfg.rope_theta)
    self.num_experts = cfg.num_experts
    self.num_layers = cfg.num_layers
    self.top_k = cfg.top_k

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               group_ids: jax.Array, audio_codes: jax.Array | None = None, *,
               elastic: ElasticMasks | None = None, routing_replay: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Returns logits [batch, seq, vocab] float32 and the aux dict of the contract.

    Args:
      tokens: [batch, seq] int32.
      positions: [batch, seq, 3] int32 (t, h, w) for Uni-RoPE.
      segment_ids: [batch, seq] int32 packing segments.
      group_ids: [batch, seq] int32; tokens of one nonzero group attend bidirectionally.
      audio_codes: optional [batch, seq, K'] int32 raw codec codes of the frame whose level-1
        code is the token (-1 elsewhere); levels 2..model.audio_levels are added to its
        embedding (audio understanding: one position per frame).
      elastic: the sub-model to run (model/elastic.py: masks_for / sample_masks); None runs
        the full model. A skipped MoE layer reports zero load and is left out of the means.
      routing_replay: optional [L_moe, batch, seq, top_k] int32 expert ids to route with
        (module docstring; a row with a negative id is routed live); aux["expert_ids"] of
        the same shape are the ids used. Under elastic masks, layer l's branch of top-k k
        reads slots ..k (a record of the same sub-model replays exactly).
      cache: optional KVCache (model/kv_cache.py): the seq new positions are written at
        cache.index and attend to every slot under the cache's mask (incremental decoding:
        seq = 1 for one token, one image scale, or a whole prompt); aux["cache"] is the
        updated cache. Without it, the positions attend to each other (training).

    aux: "expert_load" [L_moe, experts], "router_entropy" [L_moe] (mean normalised routing
    entropy), "load_balance_loss", "z_loss" (means over the MoE layers that ran),
    "expert_ids" [L_moe, batch, seq, top_k] int32 (routing record), "token_entropy"
    [L_moe, batch, seq] (per-token normalised routing entropy, for routing analysis) and,
    with a cache, "cache".
    """
    hidden, aux = self.hidden_states(tokens, positions, segment_ids, group_ids, audio_codes,
                                     elastic=elastic, routing_replay=routing_replay,
                                     cache=cache)
    return self.logits(hidden), aux

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                    group_ids: jax.Array, audio_codes: jax.Array | None = None, *,
                    elastic: ElasticMasks | None = None,
                    routing_replay: jax.Array | None = None, cache: KVCache | None = None
                    ) -> tuple[jax.Array, dict[str, Any]]:
    """__call__ before the head: (final normed hidden [batch, seq, embed], aux)."""
    if routing_replay is not None:  # Before any tracing of the layers.
      self._check_replay(routing_replay, tokens.shape)
    x = self.embed(tokens)  # [batch, seq, embed]
    if self.audio is not None and audio_codes is not None:
      x = x + self.audio.input_sum(audio_codes)
    x = sharding.constrain(x, sharding.ACT_BSD)  # Batch-split under an active mesh.
    angles = self.rope_angles(positions)  # [batch, seq, head_dim // 2]
    keep = routing = None
    if elastic is not None:
      self._check_masks(elastic)
      keep = elastic.layer_keep  # [layers] bool
      routing = dict(expert_mask=elastic.expert_mask, top_k_index=elastic.top_k_index,
                     top_ks=elastic.top_ks)
    nd = self.num_dense_layers
    stack_cache = lambda start, n: None
    if cache is not None:
      cache = kv_cache_lib.write_ids(cache, segment_ids, group_ids)
      mask = kv_cache_lib.slot_mask(cache, segment_ids, group_ids)  # [batch, seq, max_len]
      stack_cache = lambda start, n: LayerCache(k=cache.k[start:start + n],
                                                v=cache.v[start:start + n],
                                                index=cache.index, mask=mask)
    new_kv = []  # (k, v) [layers, batch, max_len, kv_heads, head_dim] of each stack
    if self.dense_layers is not None:
      x, dense_out = self.dense_layers(x, angles, segment_ids, group_ids,
                                       keep=None if keep is None else keep[:nd],
                                       cache=stack_cache(0, nd))
      new_kv.append((dense_out.get("k"), dense_out.get("v")))
    if self.moe_layers is not None:
      x, stats = self.moe_layers(x, angles, segment_ids, group_ids,
                                 keep=None if keep is None else keep[nd:], replay=routing_replay,
                                 cache=stack_cache(nd, self.num_moe_layers), **(routing or {}))
      new_kv.append((stats.get("k"), stats.get("v")))
    else:
      stats = {"expert_load": jnp.zeros((0, self.num_experts), jnp.float32),
               "router_entropy": jnp.zeros((0,), jnp.float32),
               "load_balance_loss": jnp.zeros((0,), jnp.float32),
               "z_loss": jnp.zeros((0,), jnp.float32),
               "expert_ids": jnp.zeros((0,) + tokens.shape + (self.top_k,), jnp.int32),
               "token_entropy": jnp.zeros((0,) + tokens.shape, jnp.float32)}
    mean = lambda v: jnp.mean(v) if v.size else jnp.zeros((), jnp.float32)
    if keep is not None and self.moe_layers is not None:  # Over the MoE layers that ran.
      ran = keep[nd:].astype(jnp.float32)  # [moe_layers]
      mean = lambda v: jnp.sum(v * ran) / jnp.maximum(jnp.sum(ran), 1.0)
    aux = {"expert_load": stats["expert_load"],  # [moe_layers, experts]
           "router_entropy": stats["router_entropy"],  # [moe_layers]
           "load_balance_loss": mean(stats["load_balance_loss"]),
           "z_loss": mean(stats["z_loss"]),
           "expert_ids": stats["expert_ids"],  # [moe_layers, batch, seq, top_k] int32
           "token_entropy": stats["token_entropy"]}  # [moe_layers, batch, seq]
    if cache is not None:
      aux["cache"] = dataclasses.replace(
          cache, k=jnp.concatenate([k for k, _ in new_kv]),
          v=jnp.concatenate([v for _, v in new_kv]), index=cache.index + tokens.shape[1])
    return self.final_norm(x), aux

  def _check_replay(self, routing_replay: jax.Array, token_shape: tuple[int, ...]) -> None:
    """Raises ValueError unless routing_replay is [L_moe, batch, seq, top_k] integer ids."""
    expected = (self.num_moe_layers,) + tuple(token_shape) + (self.top_k,)
    if tuple(routing_replay.shape) != expected:
      raise ValueError(
          f"routing_replay.shape={tuple(routing_replay.shape)} is not accepted: expected "
          f"{expected} (L_moe={self.num_moe_layers} MoE layers, batch, seq, "
          f"top_k={self.top_k}); a record of another model or of other inputs?")
    if not jnp.issubdtype(routing_replay.dtype, jnp.integer):
      raise ValueError(f"routing_replay.dtype={routing_replay.dtype} is not accepted: "
                       "expected integer expert ids (int32)")

  def _check_masks(self, masks: ElasticMasks) -> None:
    """Raises ValueError if masks were made for another model shape."""
    if masks.layer_keep.shape != (self.num_layers,):
      raise ValueError(f"elastic.layer_keep.shape={masks.layer_keep.shape} is not accepted: "
                       f"expected ({self.num_layers},) (model.num_layers)")
    if masks.expert_mask.shape != (self.num_experts,):
      raise ValueError(f"elastic.expert_mask.shape={masks.expert_mask.shape} is not accepted: "
                       f"expected ({self.num_experts},) (model.num_experts)")
    if not masks.top_ks or not all(0 < k <= self.num_experts for k in masks.top_ks):
      raise ValueError(f"elastic.top_ks={masks.top_ks} is not accepted: expected top-k "
                       f"values in 1..model.num_experts={self.num_experts}")

  def rope_angles(self, positions: jax.Array) -> jax.Array:
    """Uni-RoPE angles [batch, seq, head_dim // 2] of positions [batch, seq, 3]."""
    return rope.rope_angles(positions, head_dim=self.head_dim, sections=self.rope_sections,
                            theta=self.rope_theta)

  def logits(self, x: jax.Array) -> jax.Array:
    """The (shared) output head: normed hidden [batch, seq, embed] -> [batch, seq, vocab] f32."""
    return self.embed.attend(x) if self.head is None else self.head(x)

  def mtp_logits(self, hidden: jax.Array, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, group_ids: jax.Array) -> list[jax.Array]:
    """Logits [batch, seq, vocab] of each MTP depth k = 1..D (position p predicts t_{p+k+1}).

    hidden is hidden_states(...)[0] [batch, seq, embed]; the others are the model inputs.
    Positions past the row's end see token 0 (their targets are masked by the objective).
    """
    if self.mtp is None:
      return []
    angles = self.rope_angles(positions)
    out, h = [], hidden
    for k, module in enumerate(self.mtp, start=1):
      ahead = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))  # [batch, seq]: t_{p+k}
      h, normed = module(h, self.embed(ahead), angles, segment_ids, group_ids)
      out.append(self.logits(normed))
    return out

  def audio_logits(self, hidden: jax.Array, targets: jax.Array,
                   audio_targets: jax.Array) -> jax.Array | None:
    """Teacher-forced logits of codec levels 2..K, [batch, seq, K - 1, codebook]; None if K = 1.

    hidden: hidden_states(...)[0] [batch, seq, embed]; targets [batch, seq] (the level-1 token ids at
    audio positions); audio_targets [batch, seq, K'] raw codes of the predicted frame.
    """
    if self.audio is None:
      return None
    return self.audio(hidden, self.embed(targets), audio_targets)

  def update_router_bias(self, expert_load: jax.Array, rate: float,
                         active: jax.Array | None = None) -> None:
    """Applies update_router_bias in place to every MoE layer.

    expert_load: [moe_layers, E], or [micro_batches, moe_layers, E] with `active` of that
    shape (elastic training: bool, the experts each micro-batch's sub-model could route to
    in each layer); see router.update_router_bias.
    """
    if self.moe_layers is None:
      return
    if self.moe_layers.scan:
      bias = self.moe_layers.layers.ffn.router.bias  # [moe_layers, experts]
      bias[...] = update_router_bias(bias[...], expert_load, rate, active)
      return
    for i, block in enumerate(self.moe_layers.layers):
      bias = block.ffn.router.bias  # [experts]
      bias[...] = update_router_bias(bias[...], expert_load[..., i, :], rate,
                                     None if active is None else active[..., i, :])
