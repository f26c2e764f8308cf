"""Document, Section, Origin: what every source yields, and how a character span maps back to a citation.

Pure stdlib. The contract with `core`: core tokenizes `Document.joined()` once and asks
`Document.span(char_start, char_end)` where each chunk came from.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

SEPARATOR = "\n\n"  # between sections in the joined text


@dataclass(frozen=True)
class Origin:
    """Where a section starts in its source; every field a citation may name."""

    path: str  # display path (relative to the ingest root for repositories)
    line_start: int | None = None  # 1-based line of the section's first character (text, code);
    # 0 when the section opens with a one-line header (a repository's `==> path <==` marker), so the
    # file's own lines keep their numbers
    page_index: int | None = None  # 0-based page (PDF)
    page_label: str | None = None  # printed page label ("xii", "37")
    title: str | None = None  # heading, chapter title


@dataclass(frozen=True)
class Section:
    text: str
    origin: Origin


@dataclass(frozen=True)
class Skip:
    """Something left out of a document, and why. Never skip without one of these."""

    path: str
    reason: str  # short machine-readable reason: "binary", "too-large", "no-text-layer", ...
    detail: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class Document:
    name: str  # display name ("book.pdf", "myrepo/")
    kind: str  # source format: "text", "markdown", "pdf", "epub", "html", "repo"
    sections: list[Section]
    sha256: str  # hash of the source content: same content, same memory
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _starts: list[int] | None = field(default=None, repr=False, compare=False)

    def joined(self) -> str:
        """The text the model reads: sections joined by a blank line."""
        return SEPARATOR.join(s.text for s in self.sections)

    def section_starts(self) -> list[int]:
        """Character offset of each section in `joined()`."""
        if self._starts is None:
            starts, pos = [], 0
            for s in self.sections:
                starts.append(pos)
                pos += len(s.text) + len(SEPARATOR)
            self._starts = starts
        return self._starts

    def span(self, char_start: int, char_end: int) -> list[dict]:
        """Source parts covered by joined()[char_start:char_end], one dict per origin touched.

        Each part: {"path", and where known "lines": [a, b], "pages": [label_a, label_b], "title"}.
        """
        if not self.sections or char_end <= char_start:
            return []
        starts = self.section_starts()
        first = max(0, bisect.bisect_right(starts, char_start) - 1)
        last = max(0, bisect.bisect_right(starts, max(char_start, char_end - 1)) - 1)
        parts: list[dict] = []
        for i in range(first, last + 1):
            sec, base = self.sections[i], starts[i]
            lo = max(char_start, base) - base
            hi = min(char_end, base + len(sec.text)) - base
            if hi <= lo and i != first:
                continue
            o = sec.origin
            part: dict = {"path": o.path}
            if o.line_start is not None:
                a = o.line_start + sec.text.count("\n", 0, lo)
                b = a + sec.text.count("\n", lo, max(lo, hi - 1))
                # A span touching only a header line (line 0) cites the file's first line.
                part["lines"] = [max(a, 1), max(b, 1)]
            if o.page_label is not None or o.page_index is not None:
                label = o.page_label if o.page_label is not None else str(o.page_index + 1)
                part["pages"] = [label, label]
            if o.title:
                part["title"] = o.title
            _merge(parts, part)
        return parts


def _merge(parts: list[dict], part: dict) -> None:
    """Fold `part` into the previous part when both name the same file (contiguous sections)."""
    if parts and parts[-1]["path"] == part["path"]:
        prev = parts[-1]
        if "lines" in prev and "lines" in part:
            prev["lines"] = [prev["lines"][0], part["lines"][1]]
            return
        if "pages" in prev and "pages" in part:
            prev["pages"] = [prev["pages"][0], part["pages"][1]]
            return
    parts.append(part)


def label(parts: list[dict]) -> str:
    """Human citation for span() parts: "notes.txt:10-42", "book.pdf p. xii-3", "a.py:1-9, b.py:4-20"."""
    out = []
    for p in parts:
        if "pages" in p:
            a, b = p["pages"]
            out.append(f"{p['path']} p. {a}" + (f"-{b}" if b != a else ""))
        elif "lines" in p:
            a, b = p["lines"]
            out.append(f"{p['path']}:{a}" + (f"-{b}" if b != a else ""))
        elif p.get("title"):
            out.append(f"{p['path']} \"{p['title']}\"")
        else:
            out.append(p["path"])
    return ", ".join(out)


def skip_summary(skips: list[Skip]) -> dict[str, int]:
    """Count of skipped items per reason, reasons sorted: {"binary": 3, "ignored": 120}."""
    counts: dict[str, int] = {}
    for s in skips:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return dict(sorted(counts.items()))


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path) -> str:
    """Streaming sha256 of a file's bytes (the Document.sha256 of single-file sources)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
