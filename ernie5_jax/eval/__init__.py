"""Evaluation: scoring documents with a trained decoder (eval jobs come with their issues)."""
