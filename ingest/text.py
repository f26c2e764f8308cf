"""Plain text and Markdown files: one section per Markdown heading (or one for the whole file).

Bytes are decoded strictly as UTF-8 first, then by detection, then with replacement and a warning.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .base import IngestOptions
from .decode import decode_text
from .document import Document, Origin, Section
from .errors import SourceError

_HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$")


class TextSource:
    name = "text"
    suffixes = (".txt", ".md", ".markdown", ".rst", ".text", "")

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in self.suffixes

    def read(self, path: Path, options: IngestOptions) -> Document:
        size = path.stat().st_size
        if size > options.max_document_bytes:
            raise SourceError(f"{path}: {size:,} bytes is over the {options.max_document_bytes:,}-byte limit")
        data = path.read_bytes()
        text, warnings = decode_text(data, str(path))
        if not text.strip():
            raise SourceError(f"{path}: no text to read")
        kind = "markdown" if path.suffix.lower() in (".md", ".markdown") else "text"
        sections = split_markdown(text, path.name) if kind == "markdown" else [Section(text, Origin(path.name, 1))]
        return Document(path.name, kind, sections, hashlib.sha256(data).hexdigest(), warnings=warnings)


def split_markdown(text: str, display: str) -> list[Section]:
    """One section per heading; the heading line starts its section (and titles it)."""
    lines = text.split("\n")
    sections: list[Section] = []
    start, title = 0, None
    for i, line in enumerate(lines):
        m = _HEADING.match(line)
        if m and i > start:
            sections.append(Section("\n".join(lines[start:i]), Origin(display, start + 1, title=title)))
            start = i
        if m:
            title = m.group(1)
    sections.append(Section("\n".join(lines[start:]), Origin(display, start + 1, title=title)))
    # Blank-only sections carry nothing a citation could point to.
    return [s for s in sections if s.text.strip()]
