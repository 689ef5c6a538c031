"""`dedup.shingle: auto`: character n-grams for text in scripts written without spaces, word n-grams otherwise,
decided per document; on real Chinese pages it finds a near-copy that word shingles cannot see."""

from __future__ import annotations

import random
from pathlib import Path

from dataprep.dedup.documents import DedupConfig
from dataprep.dedup.minhash import jaccard, shingle_kind, spaceless_share
from tests.dataprep.test_filter_chain import _crawl_docs


def _near_copy(page: str) -> str:
    """2 % of the characters changed."""
    rng = random.Random(0)
    chars = list(page)
    for position in rng.sample(range(len(chars)), len(chars) // 50):
        chars[position] = "的"
    return "".join(chars)


def test_kind_by_script() -> None:
    assert shingle_kind("The quick brown fox jumps over the lazy dog.") == "word"
    assert shingle_kind("东京的天气今天很好，我们去公园散步吧。") == "char"
    assert shingle_kind("今日はとても良い天気ですね。公園に行きましょう。") == "char"
    assert shingle_kind("วันนี้อากาศดีมาก เราไปเดินเล่นที่สวนสาธารณะกัน") == "char"
    assert shingle_kind("오늘은 날씨가 정말 좋네요. 공원에 산책하러 갑시다.") == "word"  # Hangul separates words
    assert shingle_kind("Привет, как дела? Всё хорошо.") == "word"
    assert shingle_kind("") == "word" and spaceless_share("12 34") == 0.0
    mixed = "Price 東京都の店舗 " + "word " * 20  # a few CJK characters in English text: still words
    assert shingle_kind(mixed) == "word"


def test_config_auto_and_forced() -> None:
    text = "东京的天气今天很好"
    assert DedupConfig().shingle == "auto"
    assert DedupConfig().shingles(text) == DedupConfig(shingle="char").shingles(text)
    assert len(DedupConfig(shingle="word").shingles(text)) == 1  # one "word": the whole clause
    english = "one two three four five six seven"
    assert DedupConfig().shingles(english) == DedupConfig(shingle="word").shingles(english)


def test_real_chinese_pages_use_characters_and_a_near_copy_is_found(crawl_dir: Path) -> None:
    docs = _crawl_docs(crawl_dir / "cc-2020-34-multilingual.warc.gz")
    kinds = {d["url"].split("/")[2]: shingle_kind(d["text"]) for d in docs}
    assert kinds["0513mt.com"] == kinds["003338.cn"] == "char"
    assert kinds["01spb.ru"] == kinds["0900-hovenier.nl"] == kinds["06.live-radsport.ch"] == "word"
    page = next(d["text"] for d in docs if d["url"].split("/")[2] == "003338.cn")
    copy = _near_copy(page)
    auto, words = DedupConfig(), DedupConfig(shingle="word")
    assert jaccard(set(auto.shingles(page)), set(auto.shingles(copy))) >= auto.threshold
    assert jaccard(set(words.shingles(page)), set(words.shingles(copy))) < words.threshold


def test_built_chinese_pages_use_characters_and_a_near_copy_is_found(built_sample: Path) -> None:
    docs = [d for path in sorted(built_sample.glob("crawl-*.warc.gz")) for d in _crawl_docs(path)]
    kinds = {d["url"]: shingle_kind(d["text"]) for d in docs}
    assert {kind for url, kind in kinds.items() if "zh.news.example" in url} == {"char"}
    assert {kind for url, kind in kinds.items() if "zh.news.example" not in url} == {"word"}
    page = max((d["text"] for d in docs if "zh.news.example" in d["url"]), key=len)
    copy = _near_copy(page)
    auto, words = DedupConfig(), DedupConfig(shingle="word")
    assert jaccard(set(auto.shingles(page)), set(auto.shingles(copy))) >= auto.threshold
    assert jaccard(set(words.shingles(page)), set(words.shingles(copy))) < words.threshold
