"""Weights in and out of other formats: ERNIE 4.5 Hugging Face checkpoints (ernie45.py)."""
