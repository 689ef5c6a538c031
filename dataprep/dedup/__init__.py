"""Dedup logic: MinHash signatures, LSH, document clusters, line and paragraph dedup."""
