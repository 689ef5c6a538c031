"""The bundled sample crawl: built offline and deterministically from text Python packages ship."""
