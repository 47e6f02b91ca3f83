"""Ahead-of-time compilation for named TPU/GPU topologies from a CPU host (--mode=compile)."""
