"""Charset detection: header, meta, BOM, detection and undecodable bytes."""

from dataprep.ingest.charset import charset_from_content_type, decode_html, decode_utf8_text, normalise_charset

RUSSIAN = (
    "<html><body><p>Город стоит на берегу широкой реки, "
    "которая весной часто выходит из берегов.</p></body></html>"
)
CHINESE = (
    "<html><body><p>这座城市坐落在一条宽阔的河边，春天河水常常漫过堤岸。"
    "几百年来，这里的人们以经商为生。</p></body></html>"
)


def test_labels_follow_whatwg() -> None:
    assert normalise_charset("GB2312") == "gbk"
    assert normalise_charset("windows-1251") == "cp1251"
    assert normalise_charset("iso-8859-1") == "cp1252"
    assert normalise_charset("no-such-charset") is None
    assert charset_from_content_type('text/html; charset="UTF-8"') == "utf-8"
    assert charset_from_content_type("text/html") is None


def test_cp1251_from_http_header() -> None:
    decoded = decode_html(RUSSIAN.encode("cp1251"), "text/html; charset=windows-1251")
    assert "Город стоит на берегу" in decoded.text
    assert (decoded.encoding, decoded.source) == ("cp1251", "http-header")


def test_gbk_from_meta_without_header_charset() -> None:
    page = CHINESE.replace("<html>", '<html><head><meta charset="gb2312"></head>')
    decoded = decode_html(page.encode("gbk"), "text/html")
    assert "这座城市坐落在一条宽阔的河边" in decoded.text
    assert decoded.source == "meta"


def test_gbk_detected_without_any_declaration() -> None:
    decoded = decode_html((CHINESE * 3).encode("gbk"), None)
    assert "几百年来" in decoded.text
    assert decoded.replaced_fraction == 0.0


def test_wrong_header_falls_back_to_a_charset_that_decodes() -> None:
    decoded = decode_html(RUSSIAN.encode("utf-8"), "text/html; charset=ascii")
    assert "Город" in decoded.text


def test_bom_wins_and_is_stripped() -> None:
    decoded = decode_html(b"\xef\xbb\xbf<p>caf\xc3\xa9</p>", "text/html; charset=cp1251")
    assert decoded.text == "<p>café</p>"
    assert decoded.source == "bom"


def test_invalid_utf8_reports_replaced_share() -> None:
    decoded = decode_utf8_text(b"ok \xff\xfe\xfd")
    assert decoded.replaced_fraction > 0.3
    assert decode_utf8_text("grüße".encode()).replaced_fraction == 0.0
