"""PDF files: one Section per page, with its 0-based index and printed page label.

Extraction runs in a child process (ingest/_pdf_worker.py) under a wall-clock timeout and an address
space limit, because pypdf's history has hangs and decompression bombs; this module only starts the
child, maps its answer to Sections, Skips and one-line errors, and cleans the text (ligatures,
end-of-line hyphenation). It never imports pypdf itself.
"""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

from .base import IngestOptions
from .document import Document, Origin, Section, Skip, sha256_file
from .errors import SourceError

WORKER = Path(__file__).with_name("_pdf_worker.py")
_HYPHEN_EOL = re.compile(r"(\w)[-\u00ad]\n(?=[a-z])")


def worker_command() -> list[str]:
    """argv of the extraction child; `-I` keeps the package folder and PYTHON* variables out of it."""
    return [sys.executable, "-I", str(WORKER)]


def clean_page_text(text: str) -> str:
    """NFKC (ﬁ → fi, full-width → ASCII), join words hyphenated at line ends, drop NULs."""
    text = unicodedata.normalize("NFKC", text.replace("\x00", ""))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HYPHEN_EOL.sub(r"\1", text)
    # Lone surrogates from broken font maps cannot be written as UTF-8 later.
    return text.encode("utf-8", "replace").decode("utf-8")


def run_worker(path: Path, options: IngestOptions) -> dict:
    """Run the child on `path`; return its answer or raise SourceError with a one-line reason."""
    name = path.name
    request = {"path": str(path), "password": options.password, "memory_bytes": options.pdf_memory_bytes,
               "cpu_seconds": max(1, math.ceil(options.pdf_timeout_s)) + 1}
    try:
        proc = subprocess.run(worker_command(), input=json.dumps(request).encode(), capture_output=True,
                              timeout=options.pdf_timeout_s, check=False)  # run() kills the child on timeout
    except subprocess.TimeoutExpired:
        raise SourceError(f"{name}: skipped: malformed PDF (timeout: no result within "
                          f"{options.pdf_timeout_s:g} s; limit pdf_timeout_s)") from None
    except OSError as e:
        raise SourceError(f"{name}: cannot start the PDF extraction process: {e}") from None
    try:
        answer = json.loads(proc.stdout.decode("utf-8", "replace")) if proc.stdout else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SourceError(f"{name}: skipped: malformed PDF ({_death(proc.returncode, options)})")
    if answer.get("ok"):
        return answer
    kind, message = answer.get("kind"), answer.get("message", "")
    if kind == "password-needed":
        raise SourceError(f"{name}: encrypted; pass --password-stdin")
    if kind == "password-wrong":
        raise SourceError(f"{name}: encrypted; the password given does not open it")
    if kind == "crypto":
        raise SourceError(f"{name}: encrypted with AES, which needs the 'cryptography' package "
                          f"(pip install 'pypdf[crypto]')")
    if kind == "dependency":
        raise SourceError(f"{name}: cannot read PDFs: {message} (pip install 'pypdf[crypto]')")
    if kind == "memory":
        raise SourceError(f"{name}: skipped: malformed PDF (memory limit of {options.pdf_memory_bytes:,} bytes "
                          f"reached; limit pdf_memory_bytes)")
    raise SourceError(f"{name}: skipped: malformed PDF ({message or 'unreadable'})")


def _death(returncode: int, options: IngestOptions) -> str:
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return f"CPU time limit of {math.ceil(options.pdf_timeout_s) + 1} s reached"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"extraction process killed by {name}; memory limit {options.pdf_memory_bytes:,} bytes"
    return f"extraction process exited with status {returncode} and no result"


class PdfSource:
    name = "pdf"
    suffixes = (".pdf",)

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in self.suffixes

    def read(self, path: Path, options: IngestOptions) -> Document:
        size = path.stat().st_size
        if size > options.max_document_bytes:
            raise SourceError(f"{path.name}: {size:,} bytes is over the {options.max_document_bytes:,}-byte limit "
                              f"(max_document_bytes)")
        digest = sha256_file(path)
        answer = run_worker(path, options)
        return build_document(path.name, digest, answer, options)


def build_document(name: str, digest: str, answer: dict, options: IngestOptions) -> Document:
    """Sections, Skips and warnings from the worker's answer (pure; tested without a child)."""
    pages = answer.get("pages") or []
    if not pages:
        raise SourceError(f"{name}: the PDF has no pages")
    titles = _titles_by_page(answer.get("outline") or [], len(pages))
    sections: list[Section] = []
    skipped: list[Skip] = []
    textless = 0
    for p in pages:
        index, label = int(p["index"]), str(p.get("label") or int(p["index"]) + 1)
        where = f"{name} p. {label}"
        if "error" in p:
            skipped.append(Skip(where, "page-error", p["error"]))
            continue
        text = clean_page_text(p.get("text", ""))
        chars = len("".join(text.split()))
        images = int(p.get("images") or 0)
        if chars == 0 or (images and chars < options.pdf_min_page_chars):
            textless += 1
            detail = f"{images} image(s), {chars} character(s) of text" if images else "blank page"
            skipped.append(Skip(where, "no-text-layer", detail))
            continue
        sections.append(Section(text.strip("\n"), Origin(name, page_index=index, page_label=label,
                                                         title=titles.get(index))))
    warnings: list[str] = []
    if textless:
        warnings.append(f"{name}: {textless}/{len(pages)} pages have no text; run OCR first (e.g. ocrmypdf)")
    if not sections:
        if textless == len(pages):
            raise SourceError(f"{name}: none of its {len(pages)} pages has a text layer; run OCR first "
                              f"(e.g. ocrmypdf)")
        raise SourceError(f"{name}: no page could be read ({len(skipped)} skipped)")
    if answer.get("encrypted"):
        warnings.append(f"{name}: encrypted PDF opened")
    return Document(name, "pdf", sections, digest, skipped=skipped, warnings=warnings)


def _titles_by_page(outline: list, n_pages: int) -> dict[int, str]:
    """Each page gets the title of the last outline entry starting on or before it."""
    starts: dict[int, str] = {}
    for page, title in outline:
        if isinstance(page, int) and 0 <= page < n_pages and page not in starts:
            starts[page] = " ".join(str(title).split())
    titles, current = {}, None
    for i in range(n_pages):
        current = starts.get(i, current)
        if current:
            titles[i] = current
    return titles

