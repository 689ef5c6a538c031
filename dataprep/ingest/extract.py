"""HTML → main text with a maintained extractor: resiliparse (default, fast) or trafilatura.

`benchmarks/ingest.py` measures both for speed and for agreement with known main text; the README gives
the numbers behind the default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

ExtractorName = Literal["resiliparse", "trafilatura"]
Extractor = Callable[[str], str]


def extract_resiliparse(html: str) -> str:
    """Main-content text with resiliparse (boilerplate such as navigation, headers and footers removed)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    return extract_plain_text(
        tree, main_content=True, alt_texts=False, links=False, list_bullets=True, form_fields=False
    ).strip()


def extract_trafilatura(html: str) -> str:
    """Main-content text with trafilatura (precision-oriented defaults, tables kept, comments dropped)."""
    import trafilatura

    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    text = trafilatura.extract(
        html, include_comments=False, include_tables=True, deduplicate=False, with_metadata=False
    )
    return (text or "").strip()


EXTRACTORS: dict[str, Extractor] = {
    "resiliparse": extract_resiliparse,
    "trafilatura": extract_trafilatura,
}


def get_extractor(name: str) -> Extractor:
    """Return the extractor function called `name`; raises ValueError naming the valid choices."""
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown extractor {name!r}; choose one of {sorted(EXTRACTORS)}") from None
