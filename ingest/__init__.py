"""Sources: files and folders people have → Documents with citable origins.

A leaf package: stdlib plus each format's own parser library; never torch, transformers or core.
`SOURCES` is the registry (one file per format); `load(path)` picks a source by folder, suffix, then
content sniffing; `scan(path)` lists what a load would read and skip without reading contents.
"""
from __future__ import annotations

import lzma
import os
import stat
import zipfile
import zlib
from pathlib import Path

from .base import IngestOptions, Source
from .document import Document, Origin, Section, Skip, label, skip_summary
from .epub import EpubSource
from .errors import IngestError, SourceError, UnsupportedSourceError
from .pdf import PdfSource
from .repo import FileEntry, RepoScan, RepoSource, file_texts, read_repo, scan_repo
from .safezip import check_directory
from .text import TextSource
from .webpage import HtmlSource

SOURCES: dict[str, Source] = {
    "repo": RepoSource(),
    "pdf": PdfSource(),
    "epub": EpubSource(),
    "html": HtmlSource(),
    "text": TextSource(),
}
_SNIFF_BYTES = 4096


def sniff(path: Path) -> Source | None:
    """Source by content: %PDF-, an EPUB zip (mimetype entry), <html / <!doctype html, else valid text."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"%PDF-" in head[:1024]:
        return SOURCES["pdf"]
    if head.startswith(b"PK\x03\x04"):
        check_directory(path, IngestOptions())  # before zipfile reads the directory whole (SourceError if too big)
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if "mimetype" in names and z.getinfo("mimetype").file_size < 100 and \
                        z.read("mimetype").strip() == b"application/epub+zip":
                    return SOURCES["epub"]
                if "META-INF/container.xml" in names:
                    return SOURCES["epub"]
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, NotImplementedError, RuntimeError,
                zlib.error, lzma.LZMAError):
            return None
        return None
    lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered[:1024]:
        return SOURCES["html"]
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return SOURCES["text"]
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 4:  # a multibyte character cut by the sniff window
                return SOURCES["text"]
    return None


def detect(path: Path) -> Source:
    if path.is_dir():
        return SOURCES["repo"]
    suffix = path.suffix.lower()
    for name, source in SOURCES.items():
        if name != "text" and suffix and suffix in source.suffixes:
            return source
    if suffix in SOURCES["text"].suffixes and suffix:
        return SOURCES["text"]
    found = sniff(path)
    if found is not None:
        return found
    raise UnsupportedSourceError(f"{path}: no source reads this kind of file (known: {', '.join(SOURCES)})")


def _check_path(p: Path) -> os.stat_result:
    try:
        st = os.stat(p)  # the user named this path: following a link here is what they asked for
    except FileNotFoundError:
        raise SourceError(f"{p}: no such file or directory") from None
    except OSError as e:
        raise SourceError(f"{p}: cannot read ({e.strerror or e})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SourceError(f"{p}: not a regular file or directory; not opened")
    return st


def load(path: str | Path, options: IngestOptions | None = None) -> Document:
    """Read `path` into a Document with the matching source."""
    p = Path(path)
    _check_path(p)
    return detect(p).read(p, options or IngestOptions())


def scan(path: str | Path, options: IngestOptions | None = None) -> RepoScan:
    """What `load` would read (files) and leave out (skipped), from metadata only.

    For a folder, the repository file list; for a single file, one entry. `read_scan` then reads a
    folder's scan without listing it again.
    """
    options = options or IngestOptions()
    p = Path(path)
    st = _check_path(p)
    if stat.S_ISDIR(st.st_mode):
        return scan_repo(p, options)
    result = RepoScan(p.parent, p.name, "file")
    result.files.append(FileEntry(p.name, p.name, st.st_size, st.st_dev, st.st_ino, st.st_nlink))
    return result


def read_scan(result: RepoScan, options: IngestOptions | None = None) -> Document:
    """The Document of a scan: read_repo for a folder, load for a single file."""
    if result.mode == "file":
        return load(result.root / result.files[0].rel, options)
    return read_repo(result, options)


__all__ = ["SOURCES", "Document", "FileEntry", "IngestError", "IngestOptions", "Origin", "RepoScan", "Section",
           "Skip", "Source", "SourceError", "UnsupportedSourceError", "detect", "file_texts", "label", "load",
           "read_scan", "scan", "skip_summary", "sniff"]
