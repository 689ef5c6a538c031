"""The filter chain, fastText models and blocklists: real lid.176, the bundled toxicity model, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.filter.chain import (
    RULE_PARAMS,
    LanguageParams,
    Step,
    filter_shard,
    load_resources,
    merge_shard_stats,
    pareto_keep,
    run_chain,
)
from dataprep.filter.fasttext_models import (
    Blocklist,
    FastTextClassifier,
    ModelError,
    default_blocklist_path,
    default_langid_path,
    default_toxicity_path,
    precision_recall,
    train_supervised,
    write_training_file,
)
from dataprep.filter.training_data import chunk_words, read_jigsaw, write_jigsaw
from dataprep.ingest.documents import IngestConfig, process_record
from dataprep.ingest.readers import open_records
from dataprep.stage import StageDir

ENGLISH = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the "
           "library should stay open longer during the winter, and that the park needs new benches. ") * 6


def _step(rule: str, mode: str = "drop", **params: object) -> Step:
    return Step(rule, rule, mode, RULE_PARAMS[rule](**params))  # type: ignore[arg-type]


def _crawl_docs(path: Path, fmt: str = "warc") -> list[dict]:
    rows = []
    for record in open_records(str(path), fmt):
        kind, row, _ = process_record(record, IngestConfig(inputs=[str(path)]))
        if kind == "doc" and row:
            rows.append(row)
    return rows


def test_language_id_on_real_multilingual_crawl(crawl_dir: Path) -> None:
    docs = _crawl_docs(crawl_dir / "cc-2020-34-multilingual.warc.gz")
    labels, scores = FastTextClassifier.load(default_langid_path()).top([d["text"] for d in docs])
    by_host = {d["url"].split("/")[2]: (label, score) for d, label, score in zip(docs, labels, scores, strict=True)}
    assert by_host["01spb.ru"][0] == "ru"
    assert by_host["0900-hovenier.nl"][0] == "nl"
    assert by_host["06.live-radsport.ch"][0] == "de"
    assert by_host["0513mt.com"][0] == "zh" and by_host["003338.cn"][0] == "zh"
    assert all(0.0 < score <= 1.0 for score in scores)


def test_default_chain_on_real_samples(crawl_dir: Path) -> None:
    """Multilingual adult/gambling spam all goes; most English dolma pages stay (numbers in the README)."""
    names = ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity"]
    steps = [_step(name) for name in names]
    resources = load_resources(steps)
    spam_hosts = {"044545.com", "0513mt.com", "05925.net", "077678u.info", "096355.com"}
    multilingual = _crawl_docs(crawl_dir / "cc-2020-34-multilingual.warc.gz")
    result = run_chain(steps, resources, [d["doc_id"] for d in multilingual], [d["text"] for d in multilingual])
    spam = [i for i, d in enumerate(multilingual) if d["url"].split("/")[2] in spam_hosts]
    assert len(spam) == 5 and not result.kept[spam].any()
    english = [doc for name in ("dolma-sample-0000.warc.gz", "dolma-sample-0001.warc.gz")
               for doc in _crawl_docs(crawl_dir / name)]
    result = run_chain(steps, resources, [d["doc_id"] for d in english], [d["text"] for d in english])
    assert result.language.count("en") == len(english) == 37
    assert result.kept.sum() == 25, result.kept.sum()  # of 37; the drops are nav-heavy pages


def _built_docs(sample: Path) -> list[dict]:
    return [doc for path in sorted(sample.glob("crawl-*.warc.gz")) for doc in _crawl_docs(path)]


def _host(doc: dict) -> str:
    return doc["url"].split("/")[2]


def test_language_id_on_built_multilingual_pages(built_sample: Path) -> None:
    docs = _built_docs(built_sample)
    labels, scores = FastTextClassifier.load(default_langid_path()).top([d["text"] for d in docs])
    by_host: dict[str, set[str]] = {}
    for doc, label in zip(docs, labels, strict=True):
        by_host.setdefault(_host(doc), set()).add(label)
    for lang in ("de", "fr", "es", "ru", "zh"):
        assert by_host[f"{lang}.news.example"] == {lang}, lang
    english = [label for doc, label in zip(docs, labels, strict=True) if _host(doc).endswith(".pyref.example")]
    assert len(english) == 69 and set(english) == {"en"}, "prose, navigation and short pages alike"
    assert all(0.0 < score <= 1.0 for score in scores)


def test_default_chain_on_built_samples(built_sample: Path) -> None:
    """The same chain on the project's sample: spam, navigation-only, short and foreign pages all go."""
    names = ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity"]
    steps = [_step(name) for name in names]
    docs = _built_docs(built_sample)
    result = run_chain(steps, load_resources(steps), [d["doc_id"] for d in docs], [d["text"] for d in docs])
    kept_hosts = {_host(doc) for doc, kept in zip(docs, result.kept, strict=True) if kept}
    assert kept_hosts <= {"docs.pyref.example", "mirror.pyref.example", "notes.pyref.example"}
    noise = [i for i, d in enumerate(docs) if "/index/" in d["url"] or "/misc/" in d["url"]
             or _host(d) == "deals.spam.example" or _host(d).endswith(".news.example")]
    assert len(noise) == 40 and not result.kept[noise].any()
    assert (len(docs), int(result.kept.sum())) == (85, 16)  # the sample's pages are short docstring chunks


def test_bundled_toxicity_model_on_clear_cases() -> None:
    model = FastTextClassifier.load(default_toxicity_path())
    assert set(model.labels) == {"toxic", "clean"}
    scores = model.probability(["shut up you fucking idiot, this is shit", ENGLISH], "toxic")
    assert scores[0] > 0.5 > scores[1]


# Written for this test, never seen in training (the model learnt from prose-sample sentences labelled by
# alt-profanity-check): 12 insults and 12 ordinary sentences.
HELD_OUT_TOXIC = [
    "shut up you stupid idiot", "you are a worthless piece of shit", "go to hell you fucking moron",
    "what a dumb bitch", "this is bullshit and you are an asshole", "fuck off and die", "you ugly stupid bastard",
    "nobody cares about your crap, dickhead", "screw you, loser, you suck", "that damn idiot ruined everything",
    "kiss my ass", "you are such a pathetic jerk"]
HELD_OUT_CLEAN = [
    "The river flows north through the valley before reaching the sea.",
    "Please send the report to the committee by Friday afternoon.",
    "The library opens at nine and closes at six on weekdays.",
    "She planted tomatoes and basil in the garden last spring.",
    "The function returns a list of integers sorted in ascending order.",
    "Our train was delayed by twenty minutes because of the snow.",
    "He thanked the volunteers for their help with the festival.",
    "The museum has a large collection of medieval manuscripts.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The bridge was completed in 1932 after four years of work.",
    "Students may borrow up to five books at a time.",
    "The weather forecast predicts light rain in the evening."]


def test_bundled_toxicity_model_on_a_labelled_held_out_set() -> None:
    model = FastTextClassifier.load(default_toxicity_path())
    examples = [("toxic", text) for text in HELD_OUT_TOXIC] + [("clean", text) for text in HELD_OUT_CLEAN]
    scores = precision_recall(model, examples, "toxic")
    # 10 of 12 insults caught ("nobody cares about your crap, dickhead" and "that damn idiot ruined everything"
    # missed), 1 false alarm ("Students may borrow up to five books at a time."): exact on this fixed data
    assert scores["precision"] == pytest.approx(10 / 11) and scores["recall"] == pytest.approx(10 / 12)


def test_blocklist_counts_words_and_removes_lines() -> None:
    blocklist = Blocklist.load(default_blocklist_path())
    assert blocklist.hits("What a load of shit, you idiot") == (1, 7)
    step = _step("blocklist", max_hits=5, max_fraction=0.5)
    text = "A fine first line about rivers.\nThis line is shit.\nA fine last line."
    result = run_chain([step], load_resources([step]), ["d"], [text])
    assert result.kept[0] and result.texts[0] == "A fine first line about rivers.\nA fine last line."
    assert result.stats["blocklist"].lines_removed == 1
    dropped = run_chain([_step("blocklist", max_hits=0)], load_resources([_step("blocklist")]), ["d"], [text])
    assert not dropped.kept[0] and dropped.drop_reason[0] == "blocklist_hits"


def test_missing_and_corrupt_models_fail_before_any_document(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_resources([_step("language", model=str(tmp_path / "nope.bin"))])
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x00not a fasttext model" * 10)
    with pytest.raises(ModelError, match="language.*not a readable fastText model"):
        load_resources([_step("language", model=str(corrupt))])
    with pytest.raises(ModelError, match="not 'hq'"):
        load_resources([_step("quality", model=str(default_toxicity_path()))])


def test_annotate_mode_flags_without_dropping_and_scores_are_columns() -> None:
    steps = [_step("gopher_quality", mode="annotate"), _step("language", keep=("en", "de"))]
    result = run_chain(steps, load_resources(steps), ["short", "long", "german"],
                       ["Too short.", ENGLISH, "Der Ausschuss traf sich am Dienstag, um über den Haushalt zu reden."])
    assert list(result.kept) == [False, True, True]  # "Too short." is not English enough: dropped by language
    assert result.flags[1] == [] and result.flags[2] == ["gopher_quality:gopher_short_doc"]
    assert result.language[1:] == ["en", "de"] and result.drop_step[0] == "language"
    assert "score_gopher_quality_words" in result.scores and "score_language_score" in result.scores
    assert result.stats["gopher_quality"].docs_flagged == 2 and result.stats["gopher_quality"].docs_dropped == 0


def test_filter_shard_writes_kept_removed_and_resumes(tmp_path: Path) -> None:
    source = tmp_path / "part-00000-00000.parquet"
    texts = [ENGLISH, "Menu\nHome", ENGLISH.replace("Tuesday", "Monday")]
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "text": texts, "url": ["u1", "u2", "u3"]}), source)
    stage = StageDir(tmp_path / "filter-x")
    stage.prepare()
    steps = [_step("gopher_quality"), _step("c4")]
    stats = filter_shard(stage, source, steps, {})
    kept = pq.read_table(stage.path / "data" / source.name).to_pylist()
    removed = pq.read_table(stage.path / "removed" / "gopher_quality" / source.name).to_pylist()
    assert [d["doc_id"] for d in kept] == ["a", "c"] and [d["doc_id"] for d in removed] == ["b"]
    assert removed[0]["drop_reason"] == "gopher_short_doc" and removed[0]["text"] == "Menu\nHome"
    assert kept[0]["score_gopher_quality_words"] > 50 and kept[0]["flags"] == []
    assert filter_shard(stage, source, steps, {}) == stats  # finished units are not redone
    totals = merge_shard_stats([stats, stats], ["gopher_quality", "c4"])
    assert totals["records_in"] == 6 and totals["dropped"] == {"gopher_quality": 2}


def labelled_examples(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Two classes over disjoint 1,000-word vocabularies (fastText's trainer hits NaN on tiny vocabularies)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        label, prefix = ("hq", "river") if i % 2 else ("cc", "casino")
        examples.append((label, " ".join(f"{prefix}{n}" for n in rng.integers(0, 1000, 12))))
    return examples


def test_train_predict_and_held_out_scores(tmp_path: Path) -> None:
    examples = labelled_examples(600)
    write_training_file(tmp_path / "train.txt", examples[:500])
    train_supervised(tmp_path / "train.txt", tmp_path / "model.bin", False, epoch=10, lr=0.5, seed=0)
    model = FastTextClassifier.load(tmp_path / "model.bin")
    labels, _ = model.top(["river1 river2 river3", "casino7 casino8"])
    assert labels == ["hq", "cc"]
    scores = precision_recall(model, examples[500:], "hq")
    assert scores["precision"] > 0.95 and scores["recall"] > 0.95 and scores["examples"] == 100


def test_language_params_reject_wrong_types() -> None:
    with pytest.raises(ValueError, match="min_score"):
        LanguageParams(min_score="high")  # type: ignore[arg-type]


def test_pareto_sampling_is_seeded_by_doc_id() -> None:
    decisions = [pareto_keep(f"doc-{i}", 0.5, 9.0) for i in range(2000)]
    assert decisions == [pareto_keep(f"doc-{i}", 0.5, 9.0) for i in range(2000)]
    assert 0.0 < np.mean(decisions) < 0.1  # P(Lomax(9) > 0.5) = 1.5^-9 ≈ 0.026
    assert np.mean([pareto_keep(f"doc-{i}", 0.99, 9.0) for i in range(2000)]) > 0.8


def test_jigsaw_round_trip_and_chunks(tmp_path: Path) -> None:
    write_jigsaw(tmp_path / "labels.csv", [("toxic", "bad, words"), ("clean", "fine \"quoted\" text")])
    assert read_jigsaw(tmp_path / "labels.csv") == [("toxic", "bad, words"), ("clean", "fine \"quoted\" text")]
    assert chunk_words([" ".join(["w"] * 330)], words=150, min_words=31) == [" ".join(["w"] * 150)] * 2
