"""HTML pages: main text (trafilatura when installed, offline, no URL fetching) or all visible text
(the stdlib extractor), split into Sections at headings.

Bytes are decoded by BOM, then a <meta charset> that decodes cleanly, then UTF-8/detection. A DOCTYPE
internal subset is removed before any parser sees the markup, so no entity is ever declared.
Knows nothing about tokens or models.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path

from .base import IngestOptions
from .decode import bom_encoding, decode_text
from .document import Document, Origin, Section, sha256_file
from .errors import SourceError
from .htmltext import extract_html, strip_doctype_subset
from .text import split_markdown

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)


def decode_html(data: bytes, display: str) -> tuple[str, list[str]]:
    if bom_encoding(data) is None:
        m = _META_CHARSET.search(data[:4096])
        if m:
            try:
                enc = codecs.lookup(m.group(1).decode("ascii")).name
                text = data.decode(enc)
                return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), []
            except (LookupError, UnicodeDecodeError):
                pass  # a wrong declaration: fall back to detection
    return decode_text(data, display)


def main_text(markup: str, mode: str) -> tuple[str, str | None, str]:
    """(text, page title, extractor name). Main mode tries trafilatura, then the stdlib extractor."""
    markup = strip_doctype_subset(markup)
    fallback = extract_html(markup, mode)
    if mode == "main":
        try:
            import trafilatura
        except ImportError:
            trafilatura = None
        if trafilatura is not None:
            try:
                text = trafilatura.extract(markup, output_format="markdown", include_tables=True,
                                           include_links=False, include_comments=False, favor_recall=True)
            except Exception:  # noqa: BLE001 - a trafilatura failure falls back, it does not fail the page
                text = None
            # trafilatura drops everything on pages it thinks are boilerplate; keep the fuller text then.
            if text and len(text.strip()) >= 0.2 * len(fallback.text.strip()):
                return text.strip(), fallback.title, "trafilatura"
    return fallback.text, fallback.title, "html.parser"


class HtmlSource:
    name = "html"
    suffixes = (".html", ".htm", ".xhtml", ".xht")

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in self.suffixes

    def read(self, path: Path, options: IngestOptions) -> Document:
        size = path.stat().st_size
        if size > options.max_html_bytes:
            raise SourceError(f"{path.name}: {size:,} bytes is over the {options.max_html_bytes:,}-byte limit "
                              f"(max_html_bytes)")
        data = path.read_bytes()
        markup, warnings = decode_html(data, path.name)
        text, title, _ = main_text(markup, options.html_mode)
        if not text.strip():
            raise SourceError(f"{path.name}: no text found in the page")
        sections = [Section(s.text.strip("\n"), Origin(path.name, title=s.origin.title or title))
                    for s in split_markdown(text, path.name)]
        return Document(path.name, "html", sections, sha256_file(path), warnings=warnings)
