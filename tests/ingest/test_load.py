"""Dispatch (folder, suffix, content sniffing), scan, HTML and text sources, options validation."""
from __future__ import annotations

import sys

import pytest
from builders import make_epub, make_pdf

from combllama.ingest import (SOURCES, IngestOptions, SourceError, UnsupportedSourceError, label, load, read_scan,
                              scan, skip_summary)
from combllama.ingest.document import Skip

PAGE = ("<html><head><meta charset='windows-1252'><title>Page</title><style>.x{}</style></head><body>"
        "<nav>Home | About | Contact</nav><article><h1>Café</h1><p>This is the main paragraph of the article, "
        "long enough to count as content for any extractor that looks at it.</p><h2>More</h2><p>A second paragraph "
        "that is also long enough to be kept as real content by the heuristics.</p></article>"
        "<script>alert('x')</script><footer>copyright notice</footer></body></html>")


def test_registry_has_one_source_per_format():
    assert set(SOURCES) == {"repo", "pdf", "epub", "html", "text"}


def test_dispatch_by_suffix_and_by_content(tmp_path):
    pdf = make_pdf(tmp_path / "a.pdf", [["pdf words here on page one"]])
    epub = make_epub(tmp_path / "b.epub", [("c1", "One", "<p>epub words</p>")])
    (tmp_path / "c.html").write_bytes(PAGE.encode("cp1252"))
    for src in (pdf, epub, tmp_path / "c.html"):
        (tmp_path / (src.stem + "_nosuffix")).write_bytes(src.read_bytes())
    (tmp_path / "book.zip").write_bytes(epub.read_bytes())
    (tmp_path / "notes").write_text("plain notes\n")
    kinds = {name: load(tmp_path / name).kind for name in
             ["a.pdf", "b.epub", "c.html", "a_nosuffix", "b_nosuffix", "c_nosuffix", "book.zip", "notes"]}
    assert kinds == {"a.pdf": "pdf", "b.epub": "epub", "c.html": "html", "a_nosuffix": "pdf",
                     "b_nosuffix": "epub", "c_nosuffix": "html", "book.zip": "epub", "notes": "text"}
    assert load(tmp_path).kind == "repo"
    (tmp_path / "blob.xyz").write_bytes(b"\0\1\2\3" * 10)
    with pytest.raises(UnsupportedSourceError):
        load(tmp_path / "blob.xyz")
    with pytest.raises(SourceError, match="no such file"):
        load(tmp_path / "missing.pdf")


def test_html_main_text_and_full_mode(tmp_path):
    p = tmp_path / "page.html"
    p.write_bytes(PAGE.encode("cp1252"))
    doc = load(p)
    text = doc.joined()
    assert "Café" in text and "alert" not in text and ".x{}" not in text and "Home | About" not in text
    assert [s.origin.title for s in doc.sections] == ["Café", "More"]
    assert label(doc.span(0, 5)) == 'page.html "Café"'
    full = load(p, IngestOptions(html_mode="full")).joined()
    assert "Home | About" in full and "alert" not in full


def test_html_fallback_without_trafilatura(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trafilatura", None)  # import fails
    p = tmp_path / "page.html"
    p.write_bytes(PAGE.encode("cp1252"))
    text = load(p).joined()
    assert "main paragraph" in text and "Home | About" not in text and "alert" not in text


def test_html_entities_are_never_expanded(tmp_path):
    p = tmp_path / "xxe.html"
    p.write_text('<?xml version="1.0"?><!DOCTYPE html [<!ENTITY x SYSTEM "file:///etc/passwd">'
                 '<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
                 "<html><body><p>Some body text &x; and &b; that is long enough to be a paragraph.</p></body></html>")
    for mode in ("main", "full"):
        text = load(p, IngestOptions(html_mode=mode)).joined()
        assert "root:x:0:0" not in text and "aaaaaaaaaaaaaaaaaaaa" not in text and "Some body text" in text


def test_markdown_sections_keep_heading_titles_and_lines(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("intro\n\n# One\nfirst\n\n## Two\nsecond line\n")
    doc = load(p)
    assert [(s.origin.title, s.origin.line_start) for s in doc.sections] == [(None, 1), ("One", 3), ("Two", 6)]
    j = doc.joined()
    assert label(doc.span(j.index("second"), j.index("second") + 6)) == "notes.md:7"


def test_scan_lists_without_reading(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "a.py").write_text("a = 1\n")
    (root / "b.png").write_bytes(b"\x89PNG")
    s = scan(root)
    assert [f.rel for f in s.files] == ["a.py"] and skip_summary(s.skipped) == {"binary": 1}
    doc = read_scan(s)
    assert doc.kind == "repo" and doc.skipped == s.skipped
    one = scan(root / "a.py")
    assert [f.rel for f in one.files] == ["a.py"] and read_scan(one).kind == "text"


def test_skip_summary_and_options_validation():
    skips = [Skip("a", "binary"), Skip("b", "ignored"), Skip("c", "binary")]
    assert skip_summary(skips) == {"binary": 2, "ignored": 1}
    for bad in ({"max_file_bytes": 0}, {"pdf_timeout_s": 0}, {"zip_max_ratio": 0.5}, {"html_mode": "fancy"},
                {"max_files": -1}):
        with pytest.raises(ValueError):
            IngestOptions(**bad)


def test_malformed_declarations_are_read_as_text():
    """Found by atheris (fuzz/regressions/html): Python 3.11's html.parser raises AssertionError on an unknown
    marked-section keyword; the extractor reads such a `<!` as text and keeps the rest of the page."""
    from combllama.ingest.htmltext import extract_html, nav_links

    markup = ("<html><head><title>T</title></head><body><p>before</p><![NTITY x]><p>after</p>"
              "<a href='c1.xhtml'>One</a><!-- a comment --></body></html>")
    out = extract_html(markup, "full")
    assert "before" in out.text and "after" in out.text and "a comment" not in out.text
    assert nav_links(markup) == [("c1.xhtml", "One")]
