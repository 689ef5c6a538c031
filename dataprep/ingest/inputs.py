"""Resolve the `ingest.inputs` patterns to a sorted list of files with their fingerprints."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from dataprep.ingest.readers import detect_format

_GLOB_CHARS = "*?["


class InputError(ValueError):
    """An input pattern that matches nothing, or a file whose format cannot be told."""


@dataclass(frozen=True)
class InputFile:
    """One input file: full URI, format and fsspec fingerprint (changes when the file changes)."""

    uri: str
    fmt: str
    fingerprint: str


def _expand(pattern: str) -> list[str]:
    fs, path = url_to_fs(pattern)
    if any(ch in pattern for ch in _GLOB_CHARS):
        matches = [fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(path)]
        return sorted(m for m in matches if not fs.isdir(url_to_fs(m)[1]))
    return [pattern] if fs.exists(path) else []


def file_fingerprint(uri: str) -> str:
    """What the filesystem says identifies a file's version: its ukey, else size and ETag or mtime."""
    fs, path = url_to_fs(uri)
    try:
        return str(fs.ukey(path))
    except (NotImplementedError, AttributeError, OSError):
        info = fs.info(path)
        return f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or ''}"


def resolve_inputs(patterns: list[str], fmt: str = "auto") -> list[InputFile]:
    """Every file the patterns name, sorted and de-duplicated; fails naming the first empty pattern."""
    uris: list[str] = []
    for position, pattern in enumerate(patterns):
        matches = _expand(pattern)
        if not matches:
            raise InputError(f"ingest.inputs[{position}]: nothing found at {pattern!r}")
        uris.extend(matches)
    files = []
    for uri in sorted(set(uris)):
        try:
            file_format = detect_format(uri) if fmt == "auto" else fmt
        except ValueError as error:
            raise InputError(f"ingest.inputs: {error}") from None
        files.append(InputFile(uri, file_format, file_fingerprint(uri)))
    return files


def open_check(uri: str) -> None:
    """Open and read one byte, so an unreadable input fails before any work starts."""
    with fsspec.open(uri, "rb") as handle:
        handle.read(1)
