"""The Embedder (Ray Data callable) equals SentenceTransformer.encode; fingerprints identify model contents."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dataprep.rag.embedding import (
    DEFAULT_MODEL,
    Embedder,
    arrow_to_vectors,
    embedding_dim,
    encode,
    load_encoder,
    model_fingerprint,
)
from tests.dataprep.rag.conftest import sample_texts

TEXTS = [line for text in sample_texts().values() for line in text.splitlines() if line.strip()] + ["", "a"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    import torch

    threads = torch.get_num_threads()
    instance = Embedder(DEFAULT_MODEL, batch_size=7, threads=1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    return instance


def test_embedder_numpy_batch_equals_sentence_transformers(minilm, embedder: Embedder) -> None:
    expected = minilm.encode(TEXTS, normalize_embeddings=True)
    batch = {"text": np.array(TEXTS, dtype=object), "row_id": np.arange(len(TEXTS))}
    out = embedder(batch)
    assert set(out) == {"text", "row_id", "embedding"}
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (len(TEXTS), 384)
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["row_id"], batch["row_id"])


def test_embedder_pyarrow_batch_equals_sentence_transformers(minilm, embedder: Embedder) -> None:
    expected = minilm.encode(TEXTS, normalize_embeddings=True)
    table = pa.table({"text": TEXTS, "doc_id": [f"d{i}" for i in range(len(TEXTS))]})
    out = embedder(table)
    assert out.column_names == ["text", "doc_id", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    np.testing.assert_allclose(arrow_to_vectors(out.column("embedding")), expected, atol=1e-5)


def test_encode_is_normalised_float32(minilm) -> None:
    vectors = encode(minilm, TEXTS[:5], batch_size=2)
    assert vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encode(minilm, [], batch_size=2).shape == (0, embedding_dim(minilm)) == (0, 384)


def test_fingerprint_is_stable_and_tracks_contents(tmp_path: Path) -> None:
    first = model_fingerprint(DEFAULT_MODEL)
    assert first == model_fingerprint(Path(DEFAULT_MODEL)) and len(first) == 16
    fake = tmp_path / "model"
    (fake / "1_Pooling").mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"\x00" * 100)
    (fake / "config.json").write_text('{"hidden_size": 4}')
    (fake / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (fake / "README.md").write_text("about")
    base = model_fingerprint(fake)
    (fake / "README.md").write_text("about, edited")
    assert model_fingerprint(fake) == base
    copy = shutil.copytree(fake, tmp_path / "elsewhere")
    assert model_fingerprint(copy) == base
    (fake / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert model_fingerprint(fake) != base
    (copy / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert model_fingerprint(copy) != base


def test_missing_model_directory_is_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_encoder("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path)


def test_traced_query_encoder_equals_encode(minilm) -> None:
    from dataprep.rag.embedding import QueryEncoder

    queries = ["rivers", "How does the river flow through the valley before it reaches the sea?",
               "东京的天气今天很好", " ".join(["long"] * 400)]  # the last is truncated at 256 tokens by both
    encoder = QueryEncoder(minilm)
    assert encoder.traced is not None, "MiniLM traces"
    for query in queries:
        traced, eager = encoder.encode(query), encode(minilm, [query])
        assert traced.shape == eager.shape == (1, 384) and traced.dtype == np.float32
        np.testing.assert_allclose(traced, eager, atol=2e-5)
