"""Line/paragraph dedup logic: normalisation, counting, both removal rules, reference agreement, Bloom filter."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dataprep.dedup.lines import (
    BloomFilter,
    HashCounts,
    LineDedupConfig,
    RepeatScreen,
    _normalize_unicode,
    ccnet_reference,
    count_documents,
    doc_key,
    document_hashes,
    expected_fp_rate,
    line_dedup_local,
    normalize_line,
    partition_of,
    partitions,
    remove_segments,
    segment_hashes,
    segments,
)

NAV = ["Home | About | Contact", "Subscribe to our newsletter", "© 2024 Example Media. All rights reserved."]


def _boilerplate_reference(docs: list[tuple[str, str]], min_docs: int, mode: str = "line") -> dict[str, str]:
    """Remove every segment whose normalised text is in ≥ min_docs documents (plain Python)."""
    sep = "\n" if mode == "line" else "\n\n"
    per_doc = Counter(n for _, text in docs for n in {normalize_line(p) for p in text.split(sep)} if n)
    return {d: sep.join(p for p in t.split(sep) if per_doc[normalize_line(p)] < min_docs or not normalize_line(p))
            for d, t in docs}


def _texts(result: dict[str, tuple[str, int, int]]) -> dict[str, str]:
    return {doc_id: value[0] for doc_id, value in result.items()}


def _words(rng: random.Random, count: int) -> str:
    """Random letter words (digits would normalise to 0 and make different sentences equal)."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(count))


def _news_corpus(rng: random.Random, documents: int = 40) -> list[tuple[str, str]]:
    docs = []
    for i in range(documents):
        article = [f"Article {_words(rng, 8)}." for _ in range(rng.randrange(2, 6))]
        lines = [*NAV[: 1 + i % 3], "", *article, "", "Share this: Twitter, Facebook" if i % 4 else "Related: more"]
        docs.append((f"doc-{i:03d}", "\n".join(lines)))
    return docs


def test_normalize_follows_ccnet() -> None:
    assert normalize_line("  Hello World  ") == "hello world"
    assert normalize_line("Page 12 of ٣٤") == "page 00 of 00"
    assert normalize_line("“Quoted” — text…") == "quoted  text"
    assert normalize_line("Ünïcödé, kept; (ascii) punct!") == "ünïcödé, kept; (ascii) punct!"
    assert normalize_line("tab\tand\x00control") == "tabandcontrol"
    assert normalize_line("   ") == ""
    assert normalize_line("…") == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_fast_path_equals_general_rule(text: str) -> None:
    line = text.strip()
    assert normalize_line(text) == (_normalize_unicode(line) if line else "")


def test_segments_round_trip() -> None:
    text = "a\nb\n\nc\n\n\nd"
    assert "\n".join(segments(text, "line")) == text
    assert "\n\n".join(segments(text, "paragraph")) == text
    assert segments(text, "paragraph") == ["a\nb", "c", "\nd"]
    with pytest.raises(ValueError):
        segments(text, "off")


def test_segment_hashes_skip_empty_and_short() -> None:
    hashes = segment_hashes("Hello\n\n  \nHELLO\nhi", "line")
    assert hashes.dtype == np.uint64 and len(hashes) == 5
    assert hashes[1] == hashes[2] == 0 and hashes[0] == hashes[3] != 0 and hashes[4] != 0
    assert segment_hashes("Hello\nhi", "line", min_chars=3)[1] == 0
    assert list(document_hashes("b\na\nb\nA", "line")) == sorted(set(segment_hashes("a\nb", "line").tolist()))


def test_partition_of_matches_vector_form() -> None:
    hashes = np.array([0, 1, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    assert [partition_of(int(h), 3) for h in hashes] == partitions(hashes, 3).tolist()


def test_config_is_strict_and_frozen() -> None:
    config = LineDedupConfig(mode="line")
    with pytest.raises(ValidationError):
        LineDedupConfig(mode="line", unknown=1)
    with pytest.raises(ValidationError):
        LineDedupConfig(mode="sentence")
    with pytest.raises(ValidationError):
        config.mode = "paragraph"  # type: ignore[misc]
    assert LineDedupConfig(min_chars=5).exempt_below == 5
    assert LineDedupConfig(min_chars=5, exempt_short=False).exempt_below == 0


def test_line_in_one_document_is_never_removed() -> None:
    docs = [("a", "unique alpha\nshared"), ("b", "unique beta\nshared"), ("c", "unique gamma\nshared")]
    for rule in ("first_occurrence", "boilerplate"):
        result = _texts(line_dedup_local(docs, LineDedupConfig(mode="line", rule=rule, min_docs=2)))
        for doc_id, text in docs:
            assert text.split("\n")[0] in result[doc_id]


def test_first_occurrence_matches_reference_on_constructed_corpus() -> None:
    docs = _news_corpus(random.Random(3))
    result = line_dedup_local(docs, LineDedupConfig(mode="line"))
    reference = ccnet_reference(docs)
    assert _texts(result) == reference
    owner = min((d for d, t in docs if NAV[0] in t), key=lambda d: (doc_key(d), d))
    assert NAV[0] in result[owner][0]
    assert all(NAV[0] not in text for d, (text, _, _) in result.items() if d != owner)
    assert all(t.split("\n")[-3] in result[d][0] for d, t in docs)
    assert all(chars == len(t) - len(result[d][0]) for d, t in docs for chars in [result[d][2]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["x", "Y", "y", "z 1", "z 2", "", " ", "w…", "v"]), max_size=6),
                min_size=1, max_size=8))
def test_first_occurrence_agrees_with_reference_on_random_corpora(line_lists: list[list[str]]) -> None:
    docs = [(f"d{i}", "\n".join(lines)) for i, lines in enumerate(line_lists)]
    assert _texts(line_dedup_local(docs, LineDedupConfig(mode="line"))) == ccnet_reference(docs)
    config = LineDedupConfig(mode="line", rule="boilerplate", min_docs=2)
    assert _texts(line_dedup_local(docs, config)) == _boilerplate_reference(docs, 2)


def test_boilerplate_respects_min_docs() -> None:
    docs = [("a", "nav\nfooter\nalpha"), ("b", "nav\nfooter\nbeta"), ("c", "nav\ngamma"), ("d", "delta")]
    result = _texts(line_dedup_local(docs, LineDedupConfig(mode="line", rule="boilerplate", min_docs=3)))
    assert result == {"a": "footer\nalpha", "b": "footer\nbeta", "c": "gamma", "d": "delta"}
    assert result == _boilerplate_reference(docs, 3)
    result = _texts(line_dedup_local(docs, LineDedupConfig(mode="line", rule="boilerplate", min_docs=2)))
    assert result == {"a": "alpha", "b": "beta", "c": "gamma", "d": "delta"}


def test_short_lines_are_exempt() -> None:
    docs = [("a", "OK\nlong shared line\nalpha"), ("b", "OK\nlong shared line\nbeta")]
    exempt = line_dedup_local(docs, LineDedupConfig(mode="line", rule="boilerplate", min_docs=2, min_chars=5))
    assert _texts(exempt) == {"a": "OK\nalpha", "b": "OK\nbeta"}
    counted = line_dedup_local(docs, LineDedupConfig(mode="line", rule="boilerplate", min_docs=2, min_chars=5,
                                                     exempt_short=False))
    assert _texts(counted) == {"a": "alpha", "b": "beta"}
    first = line_dedup_local(docs, LineDedupConfig(mode="line", min_chars=5))
    assert _texts(first) == ccnet_reference(docs, min_chars=5)


def test_repeated_line_inside_one_document_counts_once() -> None:
    docs = [("a", "menu\nmenu\nmenu\nmenu\nalpha"), ("b", "menu\nbeta")]
    table = count_documents(docs, "line")
    counts, _ = table.lookup(segment_hashes("menu", "line"))
    assert counts.tolist() == [2]
    boiler = _texts(line_dedup_local(docs, LineDedupConfig(mode="line", rule="boilerplate", min_docs=3)))
    assert boiler == dict(docs)
    first = line_dedup_local(docs, LineDedupConfig(mode="line"))
    keeper, other = sorted(["a", "b"], key=lambda d: (doc_key(d), d))
    assert first[keeper][0] == dict(docs)[keeper] and "menu" not in first[other][0]
    assert first[other][1] == dict(docs)[other].count("menu")


def test_paragraph_mode() -> None:
    shared = "Cookie notice: we use cookies.\nAccept or decline."
    names = ["alpha", "beta", "gamma", "delta"]
    docs = [(f"p{i}", f"Story {n} begins.\nIt goes on.\n\n{shared}\n\nStory {n} ends.") for i, n in enumerate(names)]
    docs.append(("q", "Accept or decline.\n\nOther text."))
    result = _texts(line_dedup_local(docs, LineDedupConfig(mode="paragraph", rule="boilerplate", min_docs=3)))
    assert all(shared not in result[f"p{i}"] and f"Story {n} ends." in result[f"p{i}"] for i, n in enumerate(names))
    assert result["q"] == dict(docs)["q"]
    assert result["p0"] == "Story alpha begins.\nIt goes on.\n\nStory alpha ends."
    digits = [("n1", "Page 1 of 9\n\nOne."), ("n2", "Page 2 of 9\n\nTwo."), ("n3", "Page 3 of 8\n\nThree.")]
    assert _texts(line_dedup_local(digits, LineDedupConfig(mode="paragraph", rule="boilerplate"))) == {
        "n1": "One.", "n2": "Two.", "n3": "Three."}
    first = _texts(line_dedup_local(docs, LineDedupConfig(mode="paragraph")))
    assert first == ccnet_reference(docs, mode="paragraph")
    assert sum(shared in text for text in first.values()) == 1


def test_remove_segments_keeps_original_text_and_order() -> None:
    text = "  Keep ME  \nDROP me\nkeep too\n\nDrop Me!"
    drop = set(segment_hashes("drop me\ndrop me!", "line").tolist())
    new, removed, chars = remove_segments(text, "line", drop)
    assert (new, removed, chars) == ("  Keep ME  \nkeep too\n", 2, len(text) - len(new))
    assert remove_segments(text, "line", lambda h: h in drop)[0] == new
    owners = dict.fromkeys(drop, 7)
    assert remove_segments(text, "line", drop, owners, 7) == (text, 0, 0)
    assert remove_segments(text, "line", set())[0] == text


def test_hash_counts_independent_of_batching() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 50, 2000, dtype=np.uint64)
    keys = rng.integers(-(2**62), 2**62, 2000, dtype=np.int64)
    whole = HashCounts()
    whole.add(hashes, keys)
    pieces = HashCounts(buffer_pairs=64)
    for chunk in np.array_split(rng.permutation(2000), 37):
        pieces.add(hashes[chunk], keys[chunk])
    assert len(whole) == len(pieces) == len(np.unique(hashes))
    for name in ("hashes", "counts", "first"):
        assert np.array_equal(getattr(whole, name), getattr(pieces, name))
    h = int(hashes[0])
    assert whole.lookup(np.array([h, 999], np.uint64))[0].tolist() == [int((hashes == h).sum()), 0]
    assert whole.lookup(np.array([h], np.uint64))[1][0] == keys[hashes == h].min()
    assert whole.expected_removals("first_occurrence", 3) == 2000 - len(np.unique(hashes))


def test_bloom_false_positive_rate_within_bounds() -> None:
    rng = np.random.default_rng(1)
    members = rng.integers(0, 2**64, 20_000, dtype=np.uint64)
    others = rng.integers(0, 2**64, 200_000, dtype=np.uint64)
    bloom = BloomFilter(capacity=20_000, fp_rate=0.01)
    bloom.add(members)
    assert bloom.contains(members).all()
    measured = float(bloom.contains(others[~np.isin(others, members)]).mean())
    predicted = expected_fp_rate(20_000, bloom.num_bits, bloom.num_hashes)
    assert predicted == pytest.approx(bloom.expected_fp_rate) and predicted < 0.011
    assert 0.005 < measured < 0.015
    assert expected_fp_rate(0, 100, 3) == 0.0


def test_repeat_screen_has_no_false_negatives() -> None:
    rng = np.random.default_rng(2)
    repeated = rng.integers(0, 2**64, 500, dtype=np.uint64)
    singles = rng.integers(0, 2**64, 20_000, dtype=np.uint64)
    stream = rng.permutation(np.concatenate([repeated, repeated, singles]))
    screen = RepeatScreen(capacity=len(stream), fp_rate=0.001)
    for chunk in np.array_split(stream, 13):
        screen.add(chunk)
    candidates = screen.candidates()
    assert np.isin(repeated, candidates).all()
    assert np.isin(singles, candidates).sum() < 0.005 * len(singles)
