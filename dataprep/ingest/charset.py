"""Decode HTML bytes to text: BOM, HTTP header charset, `<meta>` charset, then statistical detection.

The order follows the WHATWG encoding sniffing algorithm. Every candidate is tried strictly; the first that
decodes without error wins. When none does, the best candidate is decoded with replacement characters and
the share of replaced characters is reported so the caller can quarantine undecodable pages.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CHARSET_PARAM = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([\w.:-]+)", re.IGNORECASE)
META_PRESCAN_BYTES = 4096


@dataclass(frozen=True)
class DecodedText:
    """Text decoded from bytes, the encoding used, where it came from and how much had to be replaced."""

    text: str
    encoding: str
    source: str
    replaced_fraction: float


def normalise_charset(label: str | None) -> str | None:
    """Map a charset label to a Python codec name following WHATWG (gb2312 → gbk, latin1 → cp1252)."""
    if not label:
        return None
    mapped = map_encoding_to_html5(label.strip().strip("\"'").lower(), fallback_utf8=False)
    if mapped is None:
        return None
    try:
        return codecs.lookup(mapped).name
    except LookupError:
        return None


def charset_from_content_type(content_type: str | None) -> str | None:
    """Return the normalised `charset=` parameter of a Content-Type header value, if any."""
    if not content_type:
        return None
    match = _CHARSET_PARAM.search(content_type)
    return normalise_charset(match.group(1)) if match else None


def charset_from_meta(html: bytes) -> str | None:
    """Return the charset declared by a `<meta charset>` or `http-equiv` tag near the start of the page."""
    match = _META_CHARSET.search(html[:META_PRESCAN_BYTES])
    return normalise_charset(match.group(1).decode("ascii", "ignore")) if match else None


def _bom_encoding(data: bytes) -> str | None:
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    return None


def _candidates(data: bytes, header_charset: str | None) -> list[tuple[str, str]]:
    """Encodings to try, in order of authority, each tagged with where it came from."""
    ordered: list[tuple[str, str]] = []
    bom = _bom_encoding(data)
    if bom:
        ordered.append((bom, "bom"))
    if header_charset:
        ordered.append((header_charset, "http-header"))
    meta = charset_from_meta(data)
    if meta:
        ordered.append((meta, "meta"))
    detected = normalise_charset(detect_encoding(data, html5_compatible=True))
    if detected:
        ordered.append((detected, "detected"))
    ordered.append(("utf-8", "default"))
    seen: set[str] = set()
    unique = []
    for name, source in ordered:
        if name not in seen:
            seen.add(name)
            unique.append((name, source))
    return unique


def decode_html(data: bytes, content_type: str | None = None) -> DecodedText:
    """Decode an HTML payload; `content_type` is the HTTP Content-Type header value when known."""
    candidates = _candidates(data, charset_from_content_type(content_type))
    for encoding, source in candidates:
        try:
            text = codecs.decode(data, encoding, errors="strict")
        except (UnicodeDecodeError, LookupError):
            continue
        return DecodedText(text.lstrip("\ufeff"), encoding, source, 0.0)
    encoding, source = candidates[0]
    text = codecs.decode(data, encoding, errors="replace").lstrip("\ufeff")
    replaced = text.count("\ufffd") / max(len(text), 1)
    return DecodedText(text, encoding, source + "+replace", replaced)


def decode_utf8_text(data: bytes) -> DecodedText:
    """Decode a payload that is supposed to be UTF-8 (WET, JSONL), reporting how much had to be replaced."""
    try:
        return DecodedText(data.decode("utf-8"), "utf-8", "declared", 0.0)
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return DecodedText(text, "utf-8", "declared+replace", text.count("\ufffd") / max(len(text), 1))
