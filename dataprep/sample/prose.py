"""English prose from what is installed locally: Python's language reference and library docstrings.

Used to build the demo's sample crawl without any download. Sources, in order: `pydoc_data.topics`
(the Python language reference), the standard library's docstrings, then docstrings of a fixed list of
installed scientific packages (skipped when absent). Paragraphs are kept only when they read as prose:
at least 120 characters, mostly letters and spaces, ending with a full stop.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

EXCLUDED_STDLIB = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
     "pydoc_data", "venv", "__main__", "xxlimited", "xxsubtype", "pty", "tty", "curses", "readline"}
)
THIRD_PARTY_SOURCES = ("numpy", "scipy", "pandas", "sqlalchemy")
MIN_PARAGRAPH_CHARS = 120
MIN_LETTER_SHARE = 0.9


@dataclass(frozen=True)
class Article:
    """A titled group of paragraphs from one module or reference topic."""

    title: str
    source: str
    paragraphs: tuple[str, ...]


def as_prose(paragraph: str) -> str | None:
    """The paragraph with whitespace folded when it reads as prose, else None."""
    text = " ".join(paragraph.split())
    if len(text) < MIN_PARAGRAPH_CHARS or text.startswith((">>>", "..", "-", "*", "=", ":", "|")):
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text) / len(text)
    if letters < MIN_LETTER_SHARE or not text.endswith("."):
        return None
    return text


def _dedup_key(paragraph: str) -> str:
    """Paragraphs equal but for the identifiers they name (templated docstrings) count as one."""
    return re.sub(r"`[^`]*`|\w+\(\)", "", paragraph)


def _quiet_import(name: str) -> ModuleType | None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - some modules exit or raise odd errors on import
                return None


def _walk(root: str) -> Iterator[ModuleType]:
    module = _quiet_import(root)
    if module is None:
        return
    yield module
    for info in sorted(pkgutil.walk_packages(getattr(module, "__path__", []), root + "."), key=lambda i: i.name):
        if any(part in info.name for part in (".test", "._test", "conftest", "__main__", ".tests")):
            continue
        sub = _quiet_import(info.name)
        if sub is not None:
            yield sub


def _docstrings(module: ModuleType) -> Iterator[str]:
    yield inspect.getdoc(module) or ""
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            yield inspect.getdoc(value) or ""
        if inspect.isclass(value):
            for attr, member in sorted(vars(value).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield inspect.getdoc(member) or ""


def _module_articles(root: str, seen: set[str]) -> Iterator[Article]:
    for module in _walk(root):
        paragraphs = []
        for doc in _docstrings(module):
            for block in doc.split("\n\n"):
                text = as_prose(block)
                if text and _dedup_key(text) not in seen:
                    seen.add(_dedup_key(text))
                    paragraphs.append(text)
        if paragraphs:
            yield Article(module.__name__, root, tuple(paragraphs))


def reference_articles(seen: set[str]) -> Iterator[Article]:
    """The language reference topics shipped with every CPython (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        paragraphs = []
        for block in topics[name].split("\n\n"):
            text = as_prose(block)
            if text and _dedup_key(text) not in seen:
                seen.add(_dedup_key(text))
                paragraphs.append(text)
        if paragraphs:
            yield Article(f"The {name} statement and topic", "pydoc_data", tuple(paragraphs))


def iter_articles(third_party: tuple[str, ...] = THIRD_PARTY_SOURCES) -> Iterator[Article]:
    """Every article, deterministic for a given Python and set of installed packages."""
    seen: set[str] = set()
    yield from reference_articles(seen)
    stdlib = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in EXCLUDED_STDLIB)
    for name in stdlib:
        yield from _module_articles(name, seen)
    for name in third_party:
        yield from _module_articles(name, seen)


def source_versions(third_party: tuple[str, ...] = THIRD_PARTY_SOURCES) -> dict[str, str]:
    """Versions of the prose sources, recorded with the sample so its content can be reproduced."""
    versions = {"python": sys.version.split()[0]}
    for name in third_party:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions
