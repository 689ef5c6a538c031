"""The bundled sample crawl: a deterministic WARC set built offline that exercises every stage.

What it holds (counts in `SAMPLE.json`): English prose pages with navigation boilerplate (prose from
`dataprep.sample.prose`), exact copies (mirrors and re-captures), near-duplicates (about 2 % of words changed),
navigation-only and very short pages, German/French/Spanish/Russian (cp1251)/Chinese (GBK) pages, pages with
spam and offensive lines, non-HTML payloads, 404/301 responses, an undecodable page and an empty one; plus
a JSONL file with one malformed line. `truth.jsonl` holds the main text of each prose page, for measuring
extraction quality. The same Python and packages always give the same bytes; a file whose bytes would not
change is not rewritten, so a rebuilt sample keeps its fingerprint and later stages stay cached.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from dataprep.evaluate.tasks import write_bundled_tasks
from dataprep.finetune.sample import write_instructions
from dataprep.sample.prose import Article, iter_articles, reference_articles, source_versions
from dataprep.shards import atomic_write_bytes

SEED = 20261122
BASE_DATE = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
SITE = "docs.pyref.example"
PARAGRAPHS_PER_PAGE = 12
NAV_ITEMS = ("Home", "Tutorial", "Library", "Language", "Glossary", "Downloads", "Community", "Blog", "About")
FOREIGN = {"de": "cp1252", "fr": "utf-8", "es": "utf-8", "ru": "cp1251", "zh": "gbk"}
SHORT_PAGES = (
    "Page not found.",
    "Please log in to continue.",
    "Subscribe to our newsletter!",
    "Loading...",
    "Access denied.",
    "Thank you for your order.",
)
EDIT_WORDS = ("quickly", "module", "green", "value", "river", "simple", "window", "later", "system", "paper")


@dataclass
class Page:
    """One HTTP response to write into the crawl."""

    url: str
    body: bytes
    kind: str
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    truth: str | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ HTML


def _nav() -> str:
    items = "".join(f'<li><a href="/{name.lower()}/">{name}</a></li>' for name in NAV_ITEMS)
    return f'<header><div class="logo">Pyref Docs</div><nav><ul>{items}</ul></nav></header>'


def render_page(title: str, paragraphs: list[str], related: list[str], lang: str = "en",
                charset: str = "utf-8") -> str:
    """A documentation-site page: header navigation, cookie banner, article, sidebar, footer."""
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    links = "".join(f'<li><a href="/lib/{html.escape(r)}.html">{html.escape(r)}</a></li>' for r in related)
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="{charset}">'
        f"<title>{html.escape(title)} | Pyref Docs</title>"
        "<script>window.dataLayer = window.dataLayer || []; function track(e) { dataLayer.push(e); }</script>"
        "<style>body { font-family: sans-serif; } nav li { display: inline; }</style></head>\n<body>\n"
        f"{_nav()}\n"
        '<div class="cookie-banner">We use cookies to improve your experience. By continuing to browse '
        "you accept our cookie policy. <button>Accept</button></div>\n"
        f'<div class="breadcrumbs"><a href="/">Home</a> &rsaquo; <a href="/library/">Library</a> &rsaquo; '
        f"{html.escape(title)}</div>\n"
        f"<main><article><h1>{html.escape(title)}</h1>\n{body}\n</article></main>\n"
        f'<aside><h3>Related pages</h3><ul>{links}</ul></aside>\n'
        "<footer><p>&copy; 2026 Pyref Docs. All rights reserved.</p>"
        '<p><a href="/privacy">Privacy policy</a> | <a href="/terms">Terms of use</a> | '
        '<a href="/contact">Contact</a></p></footer>\n</body></html>\n'
    )


def _slug(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


# ----------------------------------------------------------------------------------------------- pages


def _chunk_articles(articles: Iterable[Article], limit: int | None) -> list[tuple[str, list[str]]]:
    pages: list[tuple[str, list[str]]] = []
    for article in articles:
        paragraphs = list(article.paragraphs)
        parts = [paragraphs[i : i + PARAGRAPHS_PER_PAGE] for i in range(0, len(paragraphs), PARAGRAPHS_PER_PAGE)]
        for number, part in enumerate(parts, 1):
            title = article.title if len(parts) == 1 else f"{article.title} (part {number})"
            pages.append((title, part))
            if limit is not None and len(pages) >= limit:
                return pages
    return pages


def _sample_lines(name: str) -> list[str]:
    text = resources.files("dataprep.sample").joinpath("sample_text", f"{name}.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prose_page(title: str, paragraphs: list[str], related: list[str], kind: str = "prose") -> Page:
    markup = render_page(title, paragraphs, related)
    url = f"https://{SITE}/lib/{_slug(title)}.html"
    return Page(url, markup.encode("utf-8"), kind, truth="\n".join([title, *paragraphs]))


def _edit_words(paragraphs: list[str], rng: random.Random, share: float = 0.02) -> list[str]:
    edited = []
    for paragraph in paragraphs:
        words = paragraph.split(" ")
        for position in rng.sample(range(len(words)), round(len(words) * share)):
            words[position] = rng.choice(EDIT_WORDS)
        edited.append(" ".join(words))
    return edited


def _copies(prose: list[Page], rng: random.Random) -> list[Page]:
    """Exact copies (a mirror host and a re-capture) and near-duplicates of some prose pages."""
    copies: list[Page] = []
    count = max(2, len(prose) // 30)
    for page in rng.sample(prose, count):
        mirror = page.url.replace(SITE, "mirror.pyref.example")
        copies.append(Page(mirror, page.body, "exact_copy", truth=page.truth))
    for page in rng.sample(prose, max(1, count // 2)):
        copies.append(Page(page.url, page.body, "exact_copy", truth=page.truth))
    for page in rng.sample(prose, count):
        assert page.truth is not None
        title, *paragraphs = page.truth.split("\n")
        near = _prose_page(title, _edit_words(paragraphs, rng), [], kind="near_duplicate")
        near.url = page.url.replace(SITE, "notes.pyref.example")
        copies.append(near)
    return copies


def _foreign_pages() -> list[Page]:
    pages = []
    for lang, charset in FOREIGN.items():
        lines = _sample_lines(lang)
        for number, part in enumerate((lines[: len(lines) // 2], lines[len(lines) // 2 :]), 1):
            title = part[0].split(" ")[0] if lang != "zh" else part[0][:6]
            declared = charset if lang != "zh" else "gb2312"
            markup = render_page(title, part, [], lang=lang, charset=declared)
            content_type = "text/html" if lang == "zh" else f"text/html; charset={declared}"
            body = markup.encode(charset)
            pages.append(Page(f"https://{lang}.news.example/{number}.html", body, f"foreign_{lang}", content_type))
    return pages


def _noise_pages(rng: random.Random) -> list[Page]:
    pages = []
    for number in range(12):
        related = [f"topic-{rng.randrange(1000)}" for _ in range(25)]
        pages.append(Page(f"https://{SITE}/index/{number}.html",
                          render_page(f"Index {number}", [], related).encode(), "navigation_only"))
    for number, text in enumerate(SHORT_PAGES * 2):
        pages.append(Page(f"https://{SITE}/misc/{number}.html", render_page(text, [text], []).encode(), "short"))
    spam = _sample_lines("spam")
    for number in range(6):
        lines = [rng.choice(spam) for _ in range(8)]
        pages.append(Page(f"https://deals.spam.example/{number}.html",
                          render_page("Best deals", lines, []).encode(), "spam"))
    pages += [
        Page(f"https://{SITE}/static/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "binary",
             "image/png"),
        Page(f"https://{SITE}/static/manual.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 800, "binary",
             "application/pdf"),
        Page(f"https://{SITE}/static/site.css", b"body { color: #333; }\n" * 20, "non_html", "text/css"),
        Page(f"https://{SITE}/gone.html", render_page("Not Found", ["Not found."], []).encode(), "http_404",
             status=404),
        Page(f"https://{SITE}/old.html", b"", "http_301", status=301,
             extra_headers=[("Location", f"https://{SITE}/")]),
        Page(f"https://{SITE}/broken.html", bytes(rng.randrange(128, 256) for _ in range(3000)),
             "invalid_encoding", "text/html; charset=utf-8"),
        Page(f"https://{SITE}/empty.html", b"", "empty"),
    ]
    return pages


def _insert_lines(prose: list[Page], rng: random.Random) -> None:
    """Put spam or offensive lines into some prose pages (their truth keeps them: they are main text)."""
    spam, offensive = _sample_lines("spam"), _sample_lines("offensive")
    for index, page in enumerate(rng.sample(prose, max(2, len(prose) // 15))):
        assert page.truth is not None
        title, *paragraphs = page.truth.split("\n")
        extra = rng.choice(offensive if index % 2 else spam)
        paragraphs.insert(rng.randrange(len(paragraphs) + 1), extra)
        page.body = render_page(title, paragraphs, []).encode()
        page.truth = "\n".join([title, *paragraphs])
        page.kind = "prose_with_offensive" if index % 2 else "prose_with_spam"


def build_pages(prose_pages: int | None, seed: int = SEED) -> list[Page]:
    """All pages of the sample in crawl order."""
    rng = random.Random(seed)
    chunks = _chunk_articles(iter_articles(), prose_pages)
    titles = [title for title, _ in chunks]
    prose = [_prose_page(title, part, rng.sample(titles, min(6, len(titles)))) for title, part in chunks]
    _insert_lines(prose, rng)
    pages = prose + _copies(prose, rng) + _foreign_pages() + _noise_pages(rng)
    rng.shuffle(pages)
    return pages


# ------------------------------------------------------------------------------------------------ WARC


def _record_id(rng: random.Random) -> str:
    return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"


def _warc_bytes(pages: list[Page], name: str, rng: random.Random, start: datetime) -> bytes:
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True, warc_version="1.1")
    info = writer.create_warcinfo_record(name, {"software": "forgeline sample builder", "format": "WARC 1.1"})
    info.rec_headers.replace_header("WARC-Record-ID", _record_id(rng))
    info.rec_headers.replace_header("WARC-Date", start.strftime("%Y-%m-%dT%H:%M:%SZ"))
    writer.write_record(info)
    for number, page in enumerate(pages):
        date = (start + timedelta(minutes=number)).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = StatusAndHeaders(f"GET {page.url} HTTP/1.1", [("Host", page.url.split("/")[2])],
                                   is_http_request=True)
        headers = [("Content-Type", page.content_type), ("Content-Length", str(len(page.body))),
                   *page.extra_headers]
        reason = {200: "OK", 301: "Moved Permanently", 404: "Not Found"}[page.status]
        response = StatusAndHeaders(f"{page.status} {reason}", headers, protocol="HTTP/1.1")
        for record_type, http_headers, payload in (
            ("request", request, b""),
            ("response", response, page.body),
        ):
            record = writer.create_warc_record(
                page.url, record_type, payload=io.BytesIO(payload), http_headers=http_headers,
                warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _record_id(rng)},
            )
            writer.write_record(record)
    return buffer.getvalue()


def _jsonl_bytes(pages: list[Page]) -> bytes:
    lines = []
    for number, page in enumerate(pages):
        lines.append(json.dumps({"id": f"note-{number}", "url": page.url.replace(SITE, "wiki.pyref.example"),
                                 "text": page.truth, "date": "2026-02-01T00:00:00Z"}, sort_keys=True))
    lines.insert(len(lines) // 2, '{"id": "broken", "text": "this line is not valid JSON')
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def build_sample(out_dir: str | Path, prose_pages: int | None = None, warc_files: int = 4,
                 seed: int = SEED) -> dict[str, Any]:
    """Write the sample crawl into `out_dir`; returns (and writes) its summary."""
    out = Path(out_dir)
    pages = build_pages(prose_pages, seed)
    rng = random.Random(seed + 1)
    written = []
    for number in range(warc_files):
        name = f"crawl-{number:05d}.warc.gz"
        data = _warc_bytes(pages[number::warc_files], name, rng, BASE_DATE + timedelta(days=number))
        if _write_if_changed(out / name, data):
            written.append(name)
    prose = [p for p in pages if p.kind == "prose"]
    if _write_if_changed(out / "notes.jsonl.gz", _jsonl_bytes(prose[:20])):
        written.append("notes.jsonl.gz")
    truth = "".join(json.dumps({"url": p.url, "kind": p.kind, "text": p.truth}) + "\n"
                    for p in pages if p.truth is not None and p.kind.startswith("prose"))
    _write_if_changed(out / "truth.jsonl", truth.encode())
    reference = "".join(json.dumps({"title": a.title, "text": "\n\n".join(a.paragraphs)}) + "\n"
                        for a in reference_articles(set()))
    _write_if_changed(out / "reference.jsonl", reference.encode())
    write_bundled_tasks(out / "tasks", [p.truth for p in pages if p.truth and p.kind == "prose"])
    write_instructions(out / "instructions.jsonl", [p.truth for p in pages if p.truth and p.kind == "prose"])
    summary = {
        "pages": len(pages),
        "kinds": dict(sorted(Counter(p.kind for p in pages).items())),
        "prose_chars": sum(len(p.truth or "") for p in pages if p.kind.startswith("prose")),
        "warc_files": warc_files,
        "jsonl_records": 21,
        "sources": source_versions(),
        "seed": seed,
    }
    _write_if_changed(out / "SAMPLE.json", (json.dumps(summary, indent=2) + "\n").encode())
    return {**summary, "out_dir": str(out), "written": written}
