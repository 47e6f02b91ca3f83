"""Model parts of the next-group-of-tokens objective: MTP modules, audio heads, loss EMA.

- `MTPModule`: multi-token prediction after DeepSeek-V3 (arXiv 2412.19437, Sec. 2.2,
  eq. 21-23). Module k combines the previous depth's hidden state h^{k-1} with the
  embedding of the token k positions ahead,
      h'_p = M_k [RMSNorm(h^{k-1}_p); RMSNorm(Emb(t_{p+k}))]      (M_k: [2D, D] linear)
      h^k  = TRM_k(h')                                             (one dense-FFN Block)
  and predicts t_{p+k+1} through the decoder's shared embedding / output head after
  its own RMSNorm. h^0 is the main model's final (normed) hidden state.
- `AudioHeads`: next-codec prediction (DESIGN.md) for codec levels 2..K. The head of
  level k reads the running sum
      u_k = h + Emb(c_1) + sum_{j=2}^{k-1} E_j(c_j)
  of the backbone's hidden state h and the embeddings of the frame's earlier levels
  (teacher-forced on the frame's true codes in training), then a residual SwiGLU and
  an output projection over level k's codebook. E_j (levels 2..K) also serve audio
  *understanding*: `input_sum` adds sum_{k=2}^{K} E_k(c_k) to the level-1 token's
  embedding, so one position carries the whole frame.
- `LossEMA`: the running per-modality loss estimate of posterior loss weighting
  (ernie5_jax/train/objective.py). Non-trainable, kept in the model's non-Param
  state (like RouterBias) so that it is checkpointed with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie5_jax.model.layers import Embed, RMSNorm, fan_in_init, param

# Modalities tracked by LossEMA, in the order of input_pipeline.MODALITIES.
NUM_MODALITIES = 4


class LossEMA(nnx.Variable):
  """Non-trainable running estimate of each modality's loss, [modalities]; 0 = not seen yet."""


class MTPModule(nnx.Module):
  """One multi-token-prediction depth: norm + concat + linear, then one transformer block."""

  def __init__(self, d_model: int, block: nnx.Module, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    norm = lambda: RMSNorm(d_model, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_norm = norm()
    self.embed_norm = norm()
    self.proj = param(rngs, fan_in_init(0, 1), (2 * d_model, d_model), ("mtp_concat", "embed"),
                      param_dtype)
    self.block = block  # A dense-FFN decoder Block (passed in: it lives in decoder.py).
    self.out_norm = norm()
    self.dtype = dtype

  def __call__(self, hidden: jax.Array, ahead_embed: jax.Array, angles: jax.Array,
               segment_ids: jax.Array, group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (h^k [batch, seq, embed], RMSNorm(h^k) for the shared output head).

    Args:
      hidden: [batch, seq, embed] h^{k-1}.
      ahead_embed: [batch, seq, embed] Emb(t_{p+k}) at position p.
      angles: [batch, seq, head_dim // 2] Uni-RoPE angles of the main sequence.
      segment_ids, group_ids: [batch, seq] the main sequence's masks.
    """
    both = jnp.concatenate([self.hidden_norm(hidden), self.embed_norm(ahead_embed)], -1)
    x = jnp.einsum("BSC,CD->BSD", both, self.proj[...].astype(self.dtype))  # [batch, seq, embed]
    x, _ = self.block(x, angles, segment_ids, group_ids)
    return x, self.out_norm(x)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis with a per-level scale: x [..., L, D], scale [L, D]."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


class AudioHeads(nnx.Module):
  """Heads for codec levels 2..K (weights stacked on a leading [levels - 1] axis)."""

  def __init__(self, d_model: int, levels: int, codebook_size: int, hidden: int, *, eps: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    n = levels - 1
    # Row (k - 2) * codebook_size + c: code c of level k (k = 2..K).
    self.code_embed = Embed(n * codebook_size, d_model, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    ones = jax.nn.initializers.ones
    init = fan_in_init(1, 2, batch_axis=0)
    self.in_norm = param(rngs, ones, (n, d_model), ("audio_level", "embed"), param_dtype)
    self.w_gate = param(rngs, init, (n, d_model, hidden), ("audio_level", "embed", "mlp"),
                        param_dtype)
    self.w_up = param(rngs, init, (n, d_model, hidden), ("audio_level", "embed", "mlp"),
                      param_dtype)
    self.w_down = param(rngs, init, (n, hidden, d_model), ("audio_level", "mlp", "embed"),
                        param_dtype)
    self.out_norm = param(rngs, ones, (n, d_model), ("audio_level", "embed"), param_dtype)
    self.w_out = param(rngs, init, (n, d_model, codebook_size),
                       ("audio_level", "embed", "audio_vocab"), param_dtype)
    self.levels, self.codebook_size, self.eps, self.dtype = levels, codebook_size, eps, dtype

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """Codes of levels 2..m+1 [..., m] (raw, -1 = none) -> embeddings [..., m, embed] (0 at -1)."""
    m = codes.shape[-1]
    rows = jnp.maximum(codes, 0) + jnp.arange(m) * self.codebook_size  # [..., m]
    return self.code_embed(rows) * (codes >= 0)[..., None].astype(self.dtype)

  def input_sum(self, audio_codes: jax.Array) -> jax.Array:
    """sum_{k=2}^{K} E_k(c_k) of each frame: audio_codes [batch, seq, >=K] -> [batch, seq, embed]."""
    return jnp.sum(self.embed_codes(audio_codes[..., 1:self.levels]), axis=-2)

  def __call__(self, hidden: jax.Array, level1_embed: jax.Array,
               audio_targets: jax.Array) -> jax.Array:
    """Teacher-forced logits of levels 2..K, [batch, seq, K - 1, codebook] float32.

    Args:
      hidden: [batch, seq, embed] the backbone's final hidden state h.
      level1_embed: [batch, seq, embed] Emb(c_1), the level-1 target's token embedding.
      audio_targets: [batch, seq, >=K] raw codes of the predicted frame (-1 = none).
    """
    earlier = self.embed_codes(audio_targets[..., 1:self.levels - 1])  # [B, S, K - 2, embed]
    prev = jnp.concatenate([level1_embed[:, :, None].astype(self.dtype), earlier], axis=2)
    u = hidden[:, :, None].astype(self.dtype) + jnp.cumsum(prev, axis=2)  # [B, S, K - 1, embed]
    w = lambda p: p[...].astype(self.dtype)
    x = _rms_norm(u, self.in_norm[...], self.eps)
    gate = jnp.einsum("BSLD,LDF->BSLF", x, w(self.w_gate))
    up = jnp.einsum("BSLD,LDF->BSLF", x, w(self.w_up))
    y = u + jnp.einsum("BSLF,LFD->BSLD", jax.nn.silu(gate) * up, w(self.w_down))
    return jnp.einsum("BSLD,LDC->BSLC", _rms_norm(y, self.out_norm[...], self.eps),
                      w(self.w_out), preferred_element_type=jnp.float32)
