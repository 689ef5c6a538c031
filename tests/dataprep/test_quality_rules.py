"""Every heuristic rule on crafted documents just inside and just outside its thresholds."""

from __future__ import annotations

import pytest

from dataprep.filter.rules import (
    HEURISTIC_RULES,
    C4Params,
    FineWebParams,
    GopherQualityParams,
    GopherRepetitionParams,
    c4,
    fineweb,
    gopher_quality,
    gopher_repetition,
    split_words,
)

PROSE_WORDS = ["the", "river", "and", "the", "stone", "have", "light", "with", "paper"]


def prose(words: int) -> str:
    """`words` words of lower-case prose (mean length 4.1, stop words present), as one line with a full stop."""
    return " ".join(PROSE_WORDS[i % len(PROSE_WORDS)] for i in range(words)) + "."


def test_tokenizer_splits_like_spacy() -> None:
    assert split_words("Don't stop: it's a p-value, e.g. x ---- y... ok") == [
        "Do", "n't", "stop", ":", "it", "'s", "a", "p", "-", "value", ",", "e.g", ".", "x", "----", "y", "...", "ok"]


@pytest.mark.parametrize(("words", "reason"), [(50, None), (49, "gopher_short_doc")])
def test_gopher_min_words(words: int, reason: str | None) -> None:
    assert gopher_quality(prose(words), GopherQualityParams()).reason == reason


def test_gopher_max_words() -> None:
    params = GopherQualityParams(max_doc_words=60)
    assert gopher_quality(prose(60), params).reason is None
    assert gopher_quality(prose(61), params).reason == "gopher_long_doc"


def test_gopher_mean_word_length() -> None:
    short = " ".join(["the", "of", "to", "ab"] * 15)  # mean (3+2+2+2)/4 = 2.25
    assert gopher_quality(short, GopherQualityParams()).reason == "gopher_below_avg_threshold"
    long = " ".join(["the", "of", "extraordinarily", "incomprehensibilities"] * 15)
    assert gopher_quality(long, GopherQualityParams()).reason == "gopher_above_avg_threshold"


def test_gopher_hash_and_ellipsis_ratios() -> None:
    base = prose(100)  # 101 tokens with the full stop
    assert gopher_quality(base + " #" * 11, GopherQualityParams()).reason is None  # 11 / 112 < 0.1
    assert gopher_quality(base + " #" * 12, GopherQualityParams()).reason == "gopher_too_many_hashes"  # 12/113
    assert gopher_quality(base + " …" * 12, GopherQualityParams()).reason == "gopher_too_many_ellipsis"


def test_gopher_bullet_and_end_ellipsis_lines() -> None:
    lines = [prose(8) for _ in range(10)]
    bulleted = ["• " + line for line in lines[:9]] + lines[9:]  # 0.9: not above
    assert gopher_quality("\n".join(bulleted), GopherQualityParams()).reason is None
    all_bullets = ["- " + line for line in lines]
    assert gopher_quality("\n".join(all_bullets), GopherQualityParams()).reason == "gopher_too_many_bullets"
    trailing = [line[:-1] + "..." if i < 4 else line for i, line in enumerate(lines)]  # 0.4 > 0.3
    assert gopher_quality("\n".join(trailing), GopherQualityParams()).reason == "gopher_too_many_end_ellipsis"


def test_gopher_alpha_words_and_stop_words() -> None:
    numbers = prose(60) + " " + " ".join(["1234"] * 14)  # 60 alpha of 75 tokens = 0.80 (not below)
    assert gopher_quality(numbers, GopherQualityParams()).reason is None
    assert gopher_quality(numbers + " 99", GopherQualityParams()).reason == "gopher_below_alpha_threshold"
    no_stop = " ".join(["river", "stone", "light", "paper", "green"] * 12)
    assert gopher_quality(no_stop, GopherQualityParams()).reason == "gopher_enough_stop_words"
    assert gopher_quality(no_stop + " the and", GopherQualityParams()).reason is None


def _distinct_line(i: int) -> str:
    return f"line number {i} says something different about topic {i * 7}."


def test_repetition_duplicate_lines() -> None:
    params = GopherRepetitionParams(dup_line_char_frac=None, dup_para_char_frac=None, top_n_grams=(), dup_n_grams=())
    unique = [_distinct_line(i) for i in range(7)]
    assert gopher_repetition("\n".join(unique + [unique[0]] * 3), params).reason is None  # 3/10 = 0.3
    assert gopher_repetition("\n".join(unique + [unique[0]] * 4), params).reason == "dup_line_frac"  # 4/11


def test_repetition_duplicate_paragraphs_and_ngrams() -> None:
    paragraphs = [_distinct_line(i) for i in range(4)]
    text = "\n\n".join(paragraphs + [paragraphs[0]] * 3)  # 3 of 7 paragraphs repeat
    assert gopher_repetition(text, GopherRepetitionParams()).reason == "dup_para_frac"
    top_2 = gopher_repetition(prose(300), GopherRepetitionParams(dup_n_grams=())).scores["top_2_gram"]  # ≈ 0.1997
    just_above = GopherRepetitionParams(top_n_grams=((2, top_2 - 1e-6),), dup_n_grams=())
    just_below = GopherRepetitionParams(top_n_grams=((2, top_2 + 1e-6),), dup_n_grams=())
    assert gopher_repetition(prose(300), just_above).reason == "top_2_gram"
    assert gopher_repetition(prose(300), just_below).reason is None
    duplicated = GopherRepetitionParams(top_n_grams=())
    assert gopher_repetition(prose(300), duplicated).reason == "duplicated_5_n_grams"
    varied = " ".join(f"w{i}" for i in range(400))
    assert gopher_repetition(varied, GopherRepetitionParams()).reason is None


def test_c4_line_removal_and_document_drops() -> None:
    sentences = [f"This is sentence {i} of a page about rivers." for i in range(5)]
    page = "\n".join(["Menu", "Home | About", *sentences, "Please enable JavaScript to view the comments.",
                      "This site uses cookies to improve it.", "Read more"])
    outcome = c4(page, C4Params())
    assert outcome.reason is None
    assert outcome.text == "\n".join(sentences)
    assert outcome.lines_removed == 5
    assert c4("\n".join(sentences[:4]), C4Params()).reason == "too_few_sentences"
    assert c4("\n".join([*sentences, "Lorem ipsum dolor sit amet."]), C4Params()).reason == "lorem_ipsum"
    assert c4("\n".join([*sentences, "The dict {a: 1} is shown here."]), C4Params()).reason == "curly_bracket"
    assert c4("\n".join(sentences), C4Params(min_num_sentences=6)).reason == "too_few_sentences"


def test_fineweb_rules() -> None:
    good = "\n".join(f"This is a reasonably long line number {i} that ends properly." for i in range(10))
    assert fineweb(good, FineWebParams()).reason is None
    no_punct = "\n".join(f"This is a reasonably long line number {i} without an end" for i in range(10))
    assert fineweb(no_punct, FineWebParams()).reason == "line_punct_ratio"
    short = "\n".join(["A long enough line that ends with a full stop here."] + [f"short {i}." for i in range(3)])
    assert fineweb(short, FineWebParams()).reason == "short_line_ratio"  # 3/4 > 0.67
    duplicated = good + "\nThis is a reasonably long line number 1 that ends properly."
    assert fineweb(duplicated, FineWebParams()).reason == "char_dup_ratio"
    listy = "\n".join(f"item{i}." for i in range(40))  # 39 newlines / 80 tokens
    assert fineweb(listy, FineWebParams(short_line_thr=None)).reason == "list_ratio"


@pytest.mark.parametrize("text", ["", " ", "\n\n\n", "x" * 200_000, "word " * 50_000, "{" * 1000, "…" * 999])
@pytest.mark.parametrize("name", sorted(HEURISTIC_RULES))
def test_rules_never_crash(name: str, text: str) -> None:
    rule = HEURISTIC_RULES[name]
    outcome = rule.apply(text, rule.params())
    assert outcome.reason is None or isinstance(outcome.reason, str)
