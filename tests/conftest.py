"""Shared fixtures: one local Ray and one Prefect test server per session, crawl samples, crafted WARCs."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fl-test-"))
os.environ["FORGELINE_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("FORGELINE_INJECT_FAULT", None)

import flows  # noqa: E402,F401  (environment defaults before Prefect is imported)

REPO_ROOT = Path(__file__).resolve().parents[1]
CRAWL_DIR = REPO_ROOT.parent / "shared" / "data" / "crawl"


@pytest.fixture(scope="session")
def crawl_dir() -> Path:
    """The real crawl samples beside the checkout (`../shared/data/crawl`)."""
    if not CRAWL_DIR.is_dir():
        message = f"real crawl samples not found at {CRAWL_DIR} (they live in the shared/ folder beside the repo)"
        if os.environ.get("CI"):  # CI has the shared folder: a missing one is a failure, never a silent skip
            pytest.fail(message)
        pytest.skip(message)
    return CRAWL_DIR


@pytest.fixture(scope="session")
def built_sample() -> Path:
    """A small sample crawl built by the project (`forgeline sample`): 92 pages in 2 WARC files plus a JSONL,
    with exact and near copies, German/French/Spanish/Russian (cp1251)/Chinese (GBK) pages, spam and noise."""
    from dataprep.sample.build import build_sample

    folder = _SESSION_HOME / "built-sample"
    build_sample(folder, prose_pages=40, warc_files=2)
    return folder


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect API server (own SQLite DB) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray (127.0.0.1, 2 CPUs) shared by the session; flows find it already initialised."""
    import ray

    from workers.ray_runtime import init_ray

    init_ray(None, temp_dir=_SESSION_HOME / "ray", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture()
def flow_env(prefect_server: None, ray_local: None) -> None:
    """Everything an integration test needs to call a flow."""


def make_warc(records: list[dict], *, gzip: bool = True, version: str = "1.0") -> bytes:
    """A WARC with one response record (plus its request) per entry of `records`.

    Each entry: url, body (bytes), optional content_type, status, date.
    """
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=gzip, warc_version=version)
    for entry in records:
        status = entry.get("status", 200)
        headers = [("Content-Type", entry.get("content_type", "text/html; charset=utf-8"))]
        http = StatusAndHeaders(f"{status} X", headers, protocol="HTTP/1.1")
        record = writer.create_warc_record(
            entry["url"], "response", payload=io.BytesIO(entry["body"]), http_headers=http,
            warc_headers_dict={"WARC-Date": entry.get("date", "2024-05-01T10:00:00Z")},
        )
        writer.write_record(record)
    return buffer.getvalue()


def mid_member_cut(warc_gz: bytes, record: int) -> int:
    """A byte offset halfway through the gzip member of `record`: inside its compressed data, never in the
    8-byte gzip trailer alone (a cut there leaves the record's content whole, which the reader keeps)."""
    from warcio.archiveiterator import ArchiveIterator

    iterator, starts = ArchiveIterator(io.BytesIO(warc_gz)), []
    for entry in iterator:
        starts.append(iterator.get_record_offset())
        entry.content_stream().read()
    return (starts[record] + starts[record + 1]) // 2


def html_page(title: str, paragraphs: list[str], charset: str = "utf-8") -> str:
    """A page with navigation, footer and an article, like the sample crawl's."""
    from dataprep.sample.build import render_page

    return render_page(title, paragraphs, ["alpha", "beta"], charset=charset)


def write_corpus_stage(directory: Path, documents: list[tuple[str, str]], shard_rows: int = 40) -> Path:
    """A complete upstream stage (like filter's output): data/part-*.parquet with doc_id and text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.stage import StageDir

    stage = StageDir(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, max(1, len(documents)), shard_rows)):
        rows = documents[start:start + shard_rows]
        table = pa.table({"doc_id": [d for d, _ in rows], "text": [t for _, t in rows]},
                         schema=pa.schema([("doc_id", pa.string()), ("text", pa.string())]))
        pq.write_table(table, directory / "data" / f"part-00000-{shard:05d}.parquet")
    stage.publish({"stage": "filter", "name": directory.name, "stats": {}})
    return directory


def reference_documents(limit: int = 120) -> list[tuple[str, str]]:
    """Real English prose shipped with CPython (the language reference topics), as (doc_id, text)."""
    from dataprep.sample.prose import reference_articles

    articles = []
    for article in reference_articles(set()):
        articles.append((f"ref-{len(articles):04d}", article.title + "\n\n" + "\n\n".join(article.paragraphs)))
        if len(articles) == limit:
            break
    return articles
