"""Backend-selected compute ops: attention and MoE expert dispatch."""
