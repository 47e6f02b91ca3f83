"""Flax NNX modules of the unified MoE decoder: layers, Uni-RoPE, attention, router, MoE."""

from ernie5_jax.model.decoder import VARIANTS, Decoder, apply_variant, create_model
from ernie5_jax.model.router import RouterBias, update_router_bias

__all__ = ["VARIANTS", "Decoder", "apply_variant", "create_model", "RouterBias", "update_router_bias"]
