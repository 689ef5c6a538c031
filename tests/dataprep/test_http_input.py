"""fsspec URLs: a WARC and a JSONL.gz served over real HTTP on loopback are read like local files."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataprep.ingest.readers import detect_format, open_records
from tests.conftest import make_warc


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_records_over_http(http_root: tuple[str, Path]) -> None:
    base, folder = http_root
    pages = [{"url": f"https://h.example/{i}", "body": f"<html><p>page {i}</p></html>".encode()} for i in range(4)]
    (folder / "a.warc.gz").write_bytes(make_warc(pages))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "remote note"}\n'))
    warc = list(open_records(f"{base}/a.warc.gz", detect_format(f"{base}/a.warc.gz")))
    assert [r.url for r in warc] == [p["url"] for p in pages] and warc[3].payload == pages[3]["body"]
    (note,) = open_records(f"{base}/b.jsonl.gz", "jsonl")
    assert note.text == "remote note" and note.source == f"{base}/b.jsonl.gz"
