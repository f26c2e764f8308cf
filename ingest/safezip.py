"""A zip archive read under caps: entry count, declared and real uncompressed size per entry and in
total, compression ratio, and safe member names. Members are read into memory as capped streams,
never extracted to disk. Stdlib only; knows nothing about EPUB.
"""
from __future__ import annotations

import lzma
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .base import IngestOptions, MiB
from .document import Skip
from .errors import SourceError

_RATIO_MIN_BYTES = 1 * MiB  # small entries of repeated text compress 100:1 legitimately
_MAX_DIRECTORY_BYTES = 64 * MiB  # zipfile reads the central directory whole; an ebook's is a few hundred KiB
_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape a folder if ever extracted (None when it is fine)."""
    if any(ch in name for ch in "\x00\n\r"):
        return "control character in name"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "parent-directory component"
    return None


def escape_name(name: str) -> str:
    """Printable form of a member name for reports (no raw control characters)."""
    return name.encode("unicode_escape", "backslashreplace").decode("ascii") if not name.isprintable() else name


def check_directory(path: Path, options: IngestOptions) -> None:
    """Refuse an archive whose central directory is over the caps before zipfile reads it: zipfile keeps the
    whole directory in memory and builds a ZipInfo per record (about 50 MiB for 100,000 entries), so the
    records are counted here from their fixed headers, in constant memory, stopping past the entry cap.
    The end record's entry count is not trusted (zipfile never reads it either). Damage other than size is
    left to zipfile, which reports it."""
    with open(path, "rb") as f:
        try:
            end = zipfile._EndRecData(f)  # the stdlib's own end-record search (zip64 included)
        except OSError:
            return
        if not end:
            return
        size = end[zipfile._ECD_SIZE]
        start = end[zipfile._ECD_LOCATION] - size  # where zipfile will look (data before the zip allowed)
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        if size > _MAX_DIRECTORY_BYTES:
            raise SourceError(f"{path.name}: zip-unsafe: its central directory is {size:,} bytes (limit "
                              f"{_MAX_DIRECTORY_BYTES:,})")
        if start < 0:
            return
        f.seek(start)
        count, at = 0, 0
        while at < size:
            head = f.read(46)
            if len(head) != 46 or head[:4] != b"PK\x01\x02":
                return
            tail = sum(struct.unpack("<HHH", head[28:34]))  # name, extra field and comment lengths
            f.seek(tail, 1)
            at += 46 + tail
            count += 1
            if count > options.zip_max_entries:
                raise SourceError(f"{path.name}: zip-unsafe: more than {options.zip_max_entries:,} entries is over "
                                  f"the limit (zip_max_entries)")


def _overlap(infos) -> str | None:
    """Two entries whose local records overlap (CVE-2024-0450: many central entries over one compressed
    kernel inflate it many times over; Python's zipfile checks this only from 3.11.8/3.12.2). An entry's
    record spans at least its 30-byte header, its name and its compressed data."""
    spans = sorted((i.header_offset, i.header_offset + 30 + len(i.orig_filename.encode("utf-8", "surrogateescape"))
                    + i.compress_size, i.filename) for i in infos)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            return f"entries {escape_name(a)} and {escape_name(b)} overlap"
    return None


@dataclass
class SafeZip:
    """Members by name after the checks; `read` enforces the size caps on the real inflated bytes."""

    path: Path
    options: IngestOptions
    zf: zipfile.ZipFile
    members: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    total_read: int = 0

    @classmethod
    def open(cls, path: Path, options: IngestOptions) -> SafeZip:
        name = path.name
        try:
            check_directory(path, options)
            zf = zipfile.ZipFile(path)
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            # NotImplementedError: a zip "version" this zipfile does not read (found by atheris)
            raise SourceError(f"{name}: not a readable zip archive ({e})") from None
        if len(infos) > options.zip_max_entries:
            raise SourceError(f"{name}: zip-unsafe: {len(infos):,} entries is over the limit of "
                              f"{options.zip_max_entries:,} (zip_max_entries)")
        overlap = _overlap(infos)
        if overlap:
            raise SourceError(f"{name}: zip-unsafe: {overlap} (an overlapping-entries zip bomb?)")
        self = cls(path, options, zf)
        declared = 0
        for info in infos:
            # orig_filename: zipfile cuts `filename` at a NUL ("a.xhtml\0../x" would pass as "a.xhtml")
            why = unsafe_name(info.orig_filename)
            if why:
                self.skipped.append(Skip(f"{name}:{escape_name(info.orig_filename)}", "zip-unsafe", why))
                continue
            if info.filename.endswith("/"):
                continue
            if info.file_size > options.zip_max_entry_bytes:
                raise SourceError(f"{name}: zip-unsafe: entry {escape_name(info.filename)} inflates to "
                                  f"{info.file_size:,} bytes (limit {options.zip_max_entry_bytes:,}, zip_max_entry_bytes)")
            if info.file_size > _RATIO_MIN_BYTES and info.file_size > options.zip_max_ratio * max(info.compress_size, 1):
                ratio = info.file_size / max(info.compress_size, 1)
                raise SourceError(f"{name}: zip-unsafe: entry {escape_name(info.filename)} has compression ratio "
                                  f"{ratio:,.0f}:1 (limit {options.zip_max_ratio:g}:1; a zip bomb?)")
            declared += info.file_size
            if info.filename in self.members:
                raise SourceError(f"{name}: zip-unsafe: entry {escape_name(info.filename)} appears twice")
            self.members[info.filename] = info
        if declared > options.zip_max_total_bytes:
            raise SourceError(f"{name}: zip-unsafe: entries inflate to {declared:,} bytes in total "
                              f"(limit {options.zip_max_total_bytes:,}, zip_max_total_bytes)")
        return self

    def read(self, member: str) -> bytes:
        """Inflate one member, trusting the declared size only as an upper bound we already checked."""
        info = self.members[member]
        limit = min(info.file_size, self.options.zip_max_entry_bytes)
        try:
            with self.zf.open(info) as f:
                data = f.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError, zlib.error,
                lzma.LZMAError) as e:
            # RuntimeError: an encrypted member ("password required"); zlib.error: a corrupt deflate stream
            raise SourceError(f"{self.path.name}: cannot read {escape_name(member)} ({e})") from None
        if len(data) > limit:
            raise SourceError(f"{self.path.name}: zip-unsafe: entry {escape_name(member)} inflates past its "
                              f"declared size of {info.file_size:,} bytes")
        self.total_read += len(data)
        if self.total_read > self.options.zip_max_total_bytes:
            raise SourceError(f"{self.path.name}: zip-unsafe: more than {self.options.zip_max_total_bytes:,} "
                              f"bytes inflated (zip_max_total_bytes)")
        return data

    def close(self) -> None:
        self.zf.close()
