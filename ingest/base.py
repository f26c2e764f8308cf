"""The Source contract and the options every source reads. Stdlib only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .document import Document


@dataclass(frozen=True)
class IngestOptions:
    """Limits and switches shared by all sources; validated on construction."""

    max_file_bytes: int = 2 * 1024 * 1024  # per file inside a repository
    max_document_bytes: int = 512 * 1024 * 1024  # a single PDF/EPUB/text file
    password: str | None = None  # PDF password (from --password-stdin)

    def __post_init__(self) -> None:
        if self.max_file_bytes <= 0 or self.max_document_bytes <= 0:
            raise ValueError("size limits must be positive")


class Source(Protocol):
    name: str
    suffixes: tuple[str, ...]

    def matches(self, path: Path) -> bool: ...

    def read(self, path: Path, options: IngestOptions) -> Document: ...
