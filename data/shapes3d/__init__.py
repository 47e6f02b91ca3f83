"""Embedded procedural 3-D shapes (point cloud, mesh, 12 views) for offline M2CP runs."""
