"""Heuristic quality rules as published (Gopher quality and repetition, C4, FineWeb), with typed thresholds.

Each rule is a pure function `rule(text, params) -> RuleOutcome`: the reason it would drop the document (or
None), its scores (every measured quantity, so thresholds can be tuned from the audit columns), and for the
line-level C4 rule the rewritten text. Thresholds follow the papers and DataTrove's implementation
(`../shared/notes/reference-facts.md`); a threshold set to None disables that check.

Words are split by one regex that approximates spaCy's English tokenizer, which DataTrove uses: runs of word
characters (with inner apostrophes, dots and commas kept, as in "don't", "3.14", "e.g"), runs of `-`, `.`,
`=`, `*`, `~` or `#` as one token (spaCy keeps "----" and "..." whole), and every other non-space character as
its own token. That is what makes the chain fast; `benchmarks/filter.py`
measures how often it decides differently from DataTrove's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import filterfalse

import numpy as np
from pydantic import BaseModel, ConfigDict

_TOKEN = re.compile(
    r"n['’]t\b|['’](?:s|re|ll|ve|d|m)\b"  # contractions, split off as spaCy does ("do", "n't"; "it", "'s")
    r"|\w+(?:[^\s\w\-'’]+\w+)*|-{2,}|\.{2,}|={2,}|\*{2,}|~{2,}|#{2,}|[^\w\s]"
)
_LETTER = re.compile(r"[^\W\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
PUNCTUATION = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»‼‽⁇⁈⁉։؟۔।॥｡"
)
TERMINAL_PUNCTUATION = tuple(".!?։؟۔।॥။።。！．？｡‼‽⁇⁈⁉")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def split_words(text: str) -> list[str]:
    """Word and punctuation tokens (an approximation of spaCy's English tokenizer)."""
    return _TOKEN.findall(text.replace("n't", " n't").replace("n’t", " n’t"))


def count_sentences(line: str) -> int:
    """Sentences in a line: runs of terminal punctuation before whitespace or the end, at least one per line."""
    return max(1, len(_SENTENCE_END.findall(line)))


@dataclass
class RuleOutcome:
    """What a rule decided: `reason` is None when it keeps the document; `text` is set when it rewrote it."""

    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    text: str | None = None
    lines_removed: int = 0


class RuleParams(BaseModel):
    """Base of every rule's thresholds: unknown fields and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GopherQualityParams(RuleParams):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS


def gopher_quality(text: str, params: GopherQualityParams) -> RuleOutcome:
    """Gopher (Rae et al. 2021) quality rules, in DataTrove's order; the first failing check is the reason."""
    words = split_words(text)
    content_words = list(filterfalse(PUNCTUATION.issuperset, words))
    lines = text.splitlines() or [""]
    total = max(len(words), 1)
    scores = {
        "words": float(len(content_words)),
        "mean_word_length": sum(map(len, content_words)) / len(content_words) if content_words else 0.0,
        "hash_ratio": text.count("#") / total,
        "ellipsis_ratio": (text.count("...") + text.count("…")) / total,
        "bullet_lines": sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines),
        "ellipsis_lines": sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines),
        "alpha_words": len(list(filter(_LETTER.search, words))) / total,
        "stop_words": float(len(set(params.stop_words).intersection(words))),
    }
    checks = (
        ("gopher_short_doc", params.min_doc_words, scores["words"] < (params.min_doc_words or 0)),
        ("gopher_long_doc", params.max_doc_words, scores["words"] > (params.max_doc_words or 0)),
        ("gopher_below_avg_threshold", params.min_avg_word_length,
         scores["mean_word_length"] < (params.min_avg_word_length or 0)),
        ("gopher_above_avg_threshold", params.max_avg_word_length,
         scores["mean_word_length"] > (params.max_avg_word_length or 0)),
        ("gopher_too_many_hashes", params.max_symbol_word_ratio,
         scores["hash_ratio"] > (params.max_symbol_word_ratio or 0)),
        ("gopher_too_many_ellipsis", params.max_symbol_word_ratio,
         scores["ellipsis_ratio"] > (params.max_symbol_word_ratio or 0)),
        ("gopher_too_many_bullets", params.max_bullet_lines_ratio,
         scores["bullet_lines"] > (params.max_bullet_lines_ratio or 0)),
        ("gopher_too_many_end_ellipsis", params.max_ellipsis_lines_ratio,
         scores["ellipsis_lines"] > (params.max_ellipsis_lines_ratio or 0)),
        ("gopher_below_alpha_threshold", params.min_alpha_words_ratio,
         scores["alpha_words"] < (params.min_alpha_words_ratio or 0)),
        ("gopher_enough_stop_words", params.min_stop_words, scores["stop_words"] < (params.min_stop_words or 0)),
    )
    return RuleOutcome(_first_failure(checks), scores)


def _first_failure(checks: tuple[tuple[str, object, bool], ...]) -> str | None:
    """The name of the first enabled (threshold not None) check that failed."""
    return next((name for name, threshold, failed in checks if threshold is not None and failed), None)


class GopherRepetitionParams(RuleParams):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(elements seen before, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


_KEY_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class _WordIndex:
    """Words as integer ids plus cumulative lengths, so n-gram keys and character counts are numpy work."""

    ids: np.ndarray
    cumulative_length: np.ndarray
    _keys: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, words: list[str]) -> _WordIndex:
        vocabulary: dict[str, int] = {}
        ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in words), dtype=np.uint64,
                          count=len(words))
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        return cls(ids, np.concatenate(([0], np.cumsum(lengths))))

    def keys(self, n: int) -> np.ndarray:
        """A 64-bit key per n-gram position (a polynomial hash of word ids; exact up to 2^-64 collisions)."""
        if n in self._keys:
            return self._keys[n]
        count = max(len(self.ids) - n + 1, 0)
        if n > 1 and (n - 1) in self._keys:  # extend the (n-1)-gram keys by one word
            keys = self._keys[n - 1][:count] * _KEY_MULTIPLIER + self.ids[n - 1 : n - 1 + count] + np.uint64(1)
        else:
            keys = np.zeros(count, dtype=np.uint64)
            for offset in range(n):
                keys = keys * _KEY_MULTIPLIER + self.ids[offset : offset + count] + np.uint64(1)
        self._keys[n] = keys
        return keys

    def chars(self, start: int, n: int) -> int:
        return int(self.cumulative_length[start + n] - self.cumulative_length[start])


def _top_ngram_chars(index: _WordIndex, n: int) -> int:
    """Characters covered by the most frequent n-gram (space-joined length × count; ties → first seen)."""
    keys = index.keys(n)
    if keys.size == 0:
        return 0
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    best = int(counts.max())
    position = int(first[counts == best].min())
    return (index.chars(position, n) + n - 1) * best


def _duplicated_ngram_chars(index: _WordIndex, n: int) -> int:
    """Characters in n-grams that repeat an earlier one (skipping past each repeat, as Gopher counts).

    Only positions whose n-gram occurs more than once can ever be repeats, so the sequential scan (which
    skips n positions after each repeat) visits just those.
    """
    keys = index.keys(n)
    if keys.size == 0:
        return 0
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    seen: set[int] = set()
    repeated = skip_until = 0
    for position, key in zip(candidates.tolist(), keys[candidates].tolist(), strict=True):
        if position < skip_until:
            continue
        if key in seen:
            repeated += index.chars(position, n)
            skip_until = position + n
        else:
            seen.add(key)
    return repeated


def gopher_repetition(text: str, params: GopherRepetitionParams) -> RuleOutcome:
    """Gopher repetition rules: duplicate paragraphs and lines, top n-grams, duplicated n-grams."""
    if not text:
        return RuleOutcome("empty", {})
    size = len(text)
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    lines = _LINE_BREAKS.split(text)
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    scores = {
        "dup_para_frac": para_dups / len(paragraphs),
        "dup_para_char_frac": para_chars / size,
        "dup_line_frac": line_dups / len(lines),
        "dup_line_char_frac": line_chars / size,
    }
    reason = _first_failure(tuple((name, getattr(params, name), scores[name] > (getattr(params, name) or 0))
                                  for name in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac",
                                               "dup_line_char_frac")))
    index = _WordIndex.of(split_words(text) if reason is None else [])
    repeats = True
    for n, limit in params.top_n_grams if reason is None else ():
        scores[f"top_{n}_gram"] = _top_ngram_chars(index, n) / size
        if scores[f"top_{n}_gram"] > limit:
            reason = f"top_{n}_gram"
            break
    for n, limit in params.dup_n_grams if reason is None else ():
        scores[f"duplicated_{n}_n_grams"] = _duplicated_ngram_chars(index, n) / size if repeats else 0.0
        repeats = scores[f"duplicated_{n}_n_grams"] > 0  # no repeated n-gram → no repeated longer one
        if scores[f"duplicated_{n}_n_grams"] > limit:
            reason = f"duplicated_{n}_n_grams"
            break
    return RuleOutcome(reason, scores)


class C4Params(RuleParams):
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int | None = 5
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


def _c4_line_verdict(line: str, params: C4Params) -> tuple[str, str | None]:
    """(cleaned line, why it goes: a `line_*` reason, a document-level reason, or None to keep it)."""
    words = line.split()
    if params.max_word_length is not None and any(len(word) > params.max_word_length for word in words):
        return line, "line_too_long_word"
    if params.remove_citations:
        line = _CITATION.sub("", line)
    if params.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
        return line, "line_no_terminal_punct"
    if params.min_words_per_line is not None and len(words) < params.min_words_per_line:
        return line, "line_too_few_words"
    lowered = line.lower()
    if params.filter_lorem_ipsum and "lorem ipsum" in lowered:
        return line, "lorem_ipsum"
    if params.filter_javascript and "javascript" in lowered:
        return line, "line_javascript"
    if params.filter_curly_bracket and "{" in line:
        return line, "curly_bracket"
    if params.filter_policy and any(phrase in lowered for phrase in POLICY_PHRASES):
        return line, "line_policy"
    return line, None


def c4(text: str, params: C4Params) -> RuleOutcome:
    """C4 (Raffel et al. 2020): line-level removal, then document drops; the kept lines become the text."""
    kept: list[str] = []
    sentences = removed = 0
    for raw in text.splitlines():
        line, verdict = _c4_line_verdict(raw.strip(), params)
        if verdict in ("lorem_ipsum", "curly_bracket"):
            return RuleOutcome(verdict, {"sentences": float(sentences)})
        if verdict is not None:
            removed += 1
            continue
        sentences += count_sentences(line)
        kept.append(line)
    new_text = "\n".join(kept).strip()
    scores = {"sentences": float(sentences), "line_removed_chars": float(len(text) - len(new_text))}
    too_few = params.min_num_sentences is not None and sentences < params.min_num_sentences
    return RuleOutcome("too_few_sentences" if too_few else None, scores, new_text, removed)


class FineWebParams(RuleParams):
    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float | None = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3


def fineweb(text: str, params: FineWebParams) -> RuleOutcome:
    """FineWeb's own rules: terminal-punctuation line share, short lines, duplicated line chars, list-likeness."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return RuleOutcome("empty", {})
    punct = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
    scores = {
        "line_punct_ratio": punct,
        "short_line_ratio": sum(len(line) <= params.short_line_length for line in lines) / len(lines),
        "char_dup_ratio": _duplicates(lines)[1] / max(len(text.replace("\n", "")), 1),
        "list_ratio": text.count("\n") / max(len(split_words(text)), 1),
    }
    punct_fails = punct < (params.line_punct_thr or 0) and not (punct == 0 and params.line_punct_exclude_zero)
    checks = (
        ("line_punct_ratio", params.line_punct_thr, punct_fails),
        ("short_line_ratio", params.short_line_thr, scores["short_line_ratio"] > (params.short_line_thr or 0)),
        ("char_dup_ratio", params.char_duplicates_ratio,
         scores["char_dup_ratio"] > (params.char_duplicates_ratio or 0)),
        ("list_ratio", params.new_line_ratio, scores["list_ratio"] > (params.new_line_ratio or 0)),
    )
    return RuleOutcome(_first_failure(checks), scores)


@dataclass(frozen=True)
class HeuristicRule:
    """A registered rule: its threshold model and its function."""

    params: type[RuleParams]
    apply: Callable[[str, RuleParams], RuleOutcome]


HEURISTIC_RULES: dict[str, HeuristicRule] = {
    "gopher_quality": HeuristicRule(GopherQualityParams, gopher_quality),  # type: ignore[arg-type]
    "gopher_repetition": HeuristicRule(GopherRepetitionParams, gopher_repetition),  # type: ignore[arg-type]
    "c4": HeuristicRule(C4Params, c4),  # type: ignore[arg-type]
    "fineweb": HeuristicRule(FineWebParams, fineweb),  # type: ignore[arg-type]
}
