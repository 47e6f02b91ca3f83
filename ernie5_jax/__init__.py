"""ernie5_jax: elastic MoE pre-training of a unified multimodal autoregressive model."""
