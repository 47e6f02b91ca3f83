"""ModelNet40 for M2CP, read from a manual-download directory (nothing is fetched)."""
