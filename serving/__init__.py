"""Inference: KV cache, decoding, the engine, the Ray Serve app and retrieval (later issues)."""
