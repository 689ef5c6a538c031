"""Retrieval evaluation without labels: questions are sentences taken from held-out chunks.

A question built from chunk `c` counts as answered at rank r when `c`'s row id is the r-th result. Only
sentences that occur in no other chunk qualify. Chunks and the sentence within each are drawn with
`random.Random(seed)` over the chunks sorted by id, so the question set depends only on the corpus and seed.
Metrics: hit@k (share of questions whose chunk is in the top k) and MRR (mean of 1 / rank, 0 when absent), as
table rows for each method (dense, bm25, hybrid with the configured fusion, hybrid with the other fusion), and
a grouped bar chart of them.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataprep.rag.retriever import FUSIONS
from dataprep.shards import atomic_write_bytes

if TYPE_CHECKING:
    from dataprep.rag.retriever import Retriever

DEFAULT_KS = (1, 5, 10)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDISH = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


@dataclass(frozen=True)
class EvalQuestion:
    """A question and the row id of the chunk it was taken from."""

    question: str
    target_id: int


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (after . ! ? followed by space, after 。！？, and at line breaks), stripped."""
    return [part.strip() for part in _SENTENCE_BREAK.split(text) if part and part.strip()]


def word_count(text: str) -> int:
    """Words of `text`, each CJK character counting as one."""
    return len(_WORDISH.findall(text))


def build_questions(
    texts: Sequence[str], ids: Sequence[int], n: int, seed: int = 0, min_words: int = 6
) -> list[EvalQuestion]:
    """Up to `n` questions from distinct chunks: a sentence of at least `min_words` words found in no other
    chunk (overlapping chunks share sentences, which could not single out one chunk).

    Checking uniqueness scans every text per candidate sentence: meant for evaluation-sized corpora.
    """
    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    rng = random.Random(seed)
    corpus = sorted(zip((int(i) for i in ids), texts, strict=True))
    questions: list[EvalQuestion] = []
    for position in rng.sample(range(len(corpus)), len(corpus)):
        if len(questions) == n:
            break
        row_id, text = corpus[position]
        sentences = [s for s in split_sentences(text) if word_count(s) >= min_words]
        unique = [s for s in sentences if sum(s in other for _, other in corpus) == 1]
        if unique:
            questions.append(EvalQuestion(rng.choice(unique), row_id))
    return questions


def rank_of(ranking: Sequence[int], target: int) -> int | None:
    """The 1-based rank of `target` in `ranking`, None when absent."""
    for rank, item in enumerate(ranking, start=1):
        if int(item) == target:
            return rank
    return None


def _check_lengths(rankings: Sequence[object], targets: Sequence[object]) -> None:
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")


def hit_at_k(rankings: Sequence[Sequence[int]], targets: Sequence[int], k: int) -> float:
    """Share of questions whose target is among the first k results (0.0 for no questions)."""
    _check_lengths(rankings, targets)
    hits = sum(1 for ranking, target in zip(rankings, targets, strict=True) if target in list(ranking)[:k])
    return hits / len(targets) if targets else 0.0


def mrr(rankings: Sequence[Sequence[int]], targets: Sequence[int], k: int | None = None) -> float:
    """Mean reciprocal rank of the target (counted within the first k results when k is given)."""
    _check_lengths(rankings, targets)
    total = 0.0
    for ranking, target in zip(rankings, targets, strict=True):
        rank = rank_of(list(ranking)[:k] if k else ranking, target)
        total += 1.0 / rank if rank else 0.0
    return total / len(targets) if targets else 0.0


def rankings_by_method(retriever: Retriever, questions: Sequence[str], k: int) -> dict[str, list[list[int]]]:
    """Each question's top-k row ids by dense, BM25, hybrid (the retriever's fusion) and hybrid with the other
    fusion (named `hybrid_<method>`), from one dense and one BM25 search of the hybrid depth per question."""
    depth = max(k, retriever.hybrid.depth)
    other = next(method for method in FUSIONS if method != retriever.hybrid.method)
    results: dict[str, list[list[int]]] = {"dense": [], "bm25": [], "hybrid": [], f"hybrid_{other}": []}
    for question in questions:
        dense, lexical = retriever.dense(question, depth), retriever.lexical(question, depth)
        results["dense"].append([i for i, _ in dense[:k]])
        results["bm25"].append([i for i, _ in lexical[:k]])
        results["hybrid"].append([i for i, _ in retriever.fuse(dense, lexical, k)])
        results[f"hybrid_{other}"].append([i for i, _ in retriever.fuse(dense, lexical, k, other)])
    return results


def evaluation_rows(
    results: Mapping[str, Sequence[Sequence[int]]], targets: Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> list[dict[str, Any]]:
    """One row per method: method, questions, hit@k for each k, mrr."""
    rows = []
    for method, rankings in results.items():
        row: dict[str, Any] = {"method": method, "questions": len(targets)}
        row.update({f"hit@{k}": round(hit_at_k(rankings, targets, k), 4) for k in ks})
        row["mrr"] = round(mrr(rankings, targets), 4)
        rows.append(row)
    return rows


def eval_png(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str = "retrieval on held-out chunk sentences"
) -> Path:
    """A grouped bar chart (one group per metric, one bar per method), written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [key for key in rows[0] if key.startswith("hit@") or key == "mrr"] if rows else []
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    width = 0.8 / max(1, len(rows))
    for number, row in enumerate(rows):
        positions = [m + number * width for m in range(len(metrics))]
        axis.bar(positions, [row[metric] for metric in metrics], width, label=str(row["method"]))
    axis.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(metrics))], metrics)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("share of questions / MRR")
    axis.set_title(title)
    if rows:
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
