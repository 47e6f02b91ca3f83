"""ernie5_jax: elastic MoE pre-training of a unified multimodal autoregressive model."""

from ernie5_jax import host_memory as _host_memory

_host_memory.keep_freed_memory()
