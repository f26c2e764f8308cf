"""The Source contract and the options every source reads. Stdlib only.

Every limit lives here, validated once, so the CLI can expose them and every source reports the
limit it hit by name instead of silently truncating.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .document import Document

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3


@dataclass(frozen=True)
class IngestOptions:
    """Limits and switches shared by all sources; validated on construction."""

    # Repositories
    max_file_bytes: int = 2 * MiB  # per file inside a repository
    max_total_bytes: int = 2 * GiB  # all files of a repository together
    max_files: int = 200_000  # files read from a repository
    follow_symlinks: bool = False  # when True, only file links that stay inside the root
    use_git: bool = True  # use `git ls-files` inside a work tree
    default_deny: bool = True  # skip VCS dirs, dependencies, build outputs, lockfiles, minified files
    minified_line_chars: int = 400  # average line length above which a large file counts as minified
    # Single documents
    max_document_bytes: int = 512 * MiB  # a single PDF/EPUB/text file
    max_html_bytes: int = 64 * MiB
    password: str | None = None  # PDF password (from --password-stdin)
    pdf_timeout_s: float = 60.0  # wall clock for the extraction subprocess
    pdf_memory_bytes: int = 4 * GiB  # RLIMIT_AS of the extraction subprocess
    pdf_min_page_chars: int = 20  # an image page with less text than this counts as scanned
    # EPUB (zip) caps
    zip_max_entry_bytes: int = 256 * MiB
    zip_max_total_bytes: int = 1 * GiB
    zip_max_ratio: float = 100.0  # uncompressed/compressed, for entries over 1 MiB
    zip_max_entries: int = 20_000
    # HTML
    html_mode: str = "main"  # "main": main content (boilerplate removed); "full": all visible text

    def __post_init__(self) -> None:
        positive = ("max_file_bytes", "max_total_bytes", "max_files", "max_document_bytes", "max_html_bytes",
                    "pdf_memory_bytes", "zip_max_entry_bytes", "zip_max_total_bytes", "zip_max_entries",
                    "minified_line_chars")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"size limits must be positive: {name}={getattr(self, name)!r}")
        if not self.pdf_timeout_s > 0:
            raise ValueError(f"pdf_timeout_s must be positive, got {self.pdf_timeout_s!r}")
        if not self.zip_max_ratio >= 1:
            raise ValueError(f"zip_max_ratio must be at least 1, got {self.zip_max_ratio!r}")
        if self.pdf_min_page_chars < 0:
            raise ValueError("pdf_min_page_chars must be >= 0")
        if self.html_mode not in ("main", "full"):
            raise ValueError(f"html_mode must be 'main' or 'full', got {self.html_mode!r}")


class Source(Protocol):
    name: str
    suffixes: tuple[str, ...]

    def matches(self, path: Path) -> bool: ...

    def read(self, path: Path, options: IngestOptions) -> Document: ...
