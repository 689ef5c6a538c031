"""The bundled sample is deterministic and holds every kind of page later stages need."""

from pathlib import Path

from dataprep.sample.build import build_sample


def test_sample_is_deterministic_and_complete(tmp_path: Path) -> None:
    first = build_sample(tmp_path / "a", prose_pages=40, warc_files=2)
    second = build_sample(tmp_path / "b", prose_pages=40, warc_files=2)
    for name in ("crawl-00000.warc.gz", "crawl-00001.warc.gz", "notes.jsonl.gz", "truth.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["kinds"] == second["kinds"]
    expected = {"prose", "exact_copy", "near_duplicate", "navigation_only", "short", "spam", "foreign_de",
                "foreign_ru", "foreign_zh", "prose_with_spam", "prose_with_offensive", "binary", "invalid_encoding"}
    assert expected <= set(first["kinds"])
    again = build_sample(tmp_path / "a", prose_pages=40, warc_files=2)
    assert again["written"] == [], "an unchanged sample is not rewritten (its fingerprint stays)"
