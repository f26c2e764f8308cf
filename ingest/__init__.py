"""Sources: files and folders people have → Documents with citable origins.

A leaf package: stdlib plus each format's own parser library; never torch, transformers or core.
`SOURCES` is the registry (one file per format); `load(path)` picks the first source that matches.
"""
from __future__ import annotations

from pathlib import Path

from .base import IngestOptions, Source
from .document import Document, Origin, Section, Skip, label
from .errors import IngestError, SourceError, UnsupportedSourceError
from .text import TextSource

SOURCES: dict[str, Source] = {
    "text": TextSource(),
}


def detect(path: Path) -> Source:
    for source in SOURCES.values():
        if source.matches(path):
            return source
    raise UnsupportedSourceError(f"{path}: no source reads this kind of file (known: {', '.join(SOURCES)})")


def load(path: str | Path, options: IngestOptions | None = None) -> Document:
    """Read `path` into a Document with the matching source."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory")
    return detect(p).read(p, options or IngestOptions())


__all__ = ["SOURCES", "Document", "IngestError", "IngestOptions", "Origin", "Section", "Skip", "Source",
           "SourceError", "UnsupportedSourceError", "detect", "label", "load"]
