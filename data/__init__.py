"""Offline TFDS dataset builders (one folder per dataset) and `ensure_built`."""

from data.registry import KNOWN_DATASETS, builder, ensure_built  # noqa: F401
