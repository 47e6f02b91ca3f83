"""RL post-training (issue 8): verifiable tasks, rollouts, GSPO/MISC/WPSM objective, buffer."""
