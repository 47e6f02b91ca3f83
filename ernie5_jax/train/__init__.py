"""Training: optimizer, train state and step, checkpoints (orbax + grain), the trainer loop."""
