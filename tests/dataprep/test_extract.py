"""Both extractors keep the article and drop navigation, cookie banner and footer."""

import pytest

from dataprep.ingest.extract import EXTRACTORS, get_extractor
from tests.conftest import html_page

ARTICLE = [
    "The interpreter reads each statement of the program in turn and executes it before moving on to the next.",
    "A module is a file containing definitions and statements that can be imported into other programs.",
    "Exceptions are raised when an error occurs and may be handled by a try statement further up the stack.",
]


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_main_text_without_boilerplate(name: str) -> None:
    text = get_extractor(name)(html_page("Statements", ARTICLE))
    for paragraph in ARTICLE:
        assert paragraph in text
    assert "All rights reserved" not in text
    assert "cookie policy" not in text


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_empty_and_degenerate_html(name: str) -> None:
    extract = get_extractor(name)
    assert extract("") == ""
    assert extract("<html><body></body></html>") == ""
    assert isinstance(extract("<p>" + "x" * 200_000), str)


def test_unknown_extractor_names_choices() -> None:
    with pytest.raises(ValueError, match="resiliparse"):
        get_extractor("boilerpipe")
