"""Model FLOPs of the decoder, counted analytically (what MFU is taken against).

PaLM (Chowdhery et al. 2022, arXiv 2204.02311, App. B): a train step costs 6 FLOPs per
active matmul parameter per token (forward 2, backward 4) plus 12 * layers * heads *
head_dim * seq per token for attention scores and values (causal masking not discounted,
as in PaLM). Embedding lookups are free; the output head counts. An elastic step runs
1 + elastic.sub_models passes; the sub-models' FLOPs are not counted (they are smaller and
their share varies per step), so an elastic step's MFU is a lower bound.
"""

from __future__ import annotations

import ml_collections


def active_matmul_params(m: ml_collections.ConfigDict) -> dict[str, int]:
  """Matmul parameters one token uses, by part, for config.model `m` (embedding excluded)."""
  attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o, k, v
  dense_ffn = 3 * m.d_model * m.dense_hidden
  moe_ffn = (m.d_model * m.num_experts  # router
             + (m.top_k + m.num_shared_experts) * 3 * m.d_model * m.expert_hidden)
  num_moe = m.num_layers - m.num_dense_layers
  return {"attention": m.num_layers * attn, "dense_ffn": m.num_dense_layers * dense_ffn,
          "moe_ffn": num_moe * moe_ffn, "head": m.vocab_size * m.d_model}


def train_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """6 * active params + 12 * L * H * Dh * S (module doc): one forward + backward pass."""
  m = config.model
  params = sum(active_matmul_params(m).values())
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * config.data.seq_len
  return 6.0 * params + attention


def decode_flops_per_token(config: ml_collections.ConfigDict, context: int) -> float:
  """One decoded token's forward: 2 * active params + 4 * L * H * Dh * context."""
  m = config.model
  params = sum(active_matmul_params(m).values())
  return 2.0 * params + 4 * m.num_layers * m.num_heads * m.head_dim * context
