"""Ingest logic: input resolution, readers (WARC/WET/JSONL/Parquet), charset, extraction, documents."""
