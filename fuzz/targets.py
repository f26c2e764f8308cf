"""Fuzz targets: bytes in, and the only exceptions allowed out are the typed errors a user would see
(core's CombllamaError for memory files, ingest's IngestError for documents). Anything else that
escapes is a crash: fuzz/run.py (atheris) hunts for them, tests/reliability/test_rel_fuzz.py replays
the committed corpus and every past crash through the same functions.

Each target reads its input the way the product does: memory parsers on the bytes, document sources
through Source.read on a scratch file, the PDF through the extraction worker's own code (in process,
for coverage; the replay test also runs the real worker process), a repository from a tree built
out of the bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="combllama-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def _scratch_file(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def manifest(data: bytes) -> None:
    from combllama.core.errors import CombllamaError
    from combllama.core.memory.format import parse_manifest

    try:
        parse_manifest(data, "fuzz")
    except CombllamaError:
        pass


def st_header(data: bytes) -> None:
    from combllama.core.errors import CombllamaError
    from combllama.core.memory.format import safetensors_header, strict_json

    try:
        strict_json(data, "fuzz")
    except CombllamaError:
        pass
    try:
        safetensors_header(data, "fuzz")
    except CombllamaError:
        pass


def chunk(data: bytes) -> None:
    """A whole chunk file with a matching checksum: only the header pre-parser, safetensors and the
    content checks stand between it and the attach."""
    from combllama.core.errors import CombllamaError
    from combllama.core.memory.bundle import _load_verified
    from combllama.core.memory.format import safetensors_header

    path = _scratch_file("chunk.safetensors", data)
    try:
        header = safetensors_header(data, "fuzz")
        expect = {k: [v["dtype"], list(v["shape"])] for k, v in header.items() if k != "__metadata__"}
    except CombllamaError:
        expect = {}
    try:
        _load_verified(path, len(data), hashlib.sha256(data).hexdigest(), expect, "fuzz")
    except CombllamaError:
        pass


def _read(source_name: str, suffix: str, data: bytes) -> None:
    from combllama.ingest import SOURCES, IngestError, IngestOptions

    path = _scratch_file(f"doc{suffix}", data)
    try:
        SOURCES[source_name].read(path, IngestOptions())
    except IngestError:
        pass


def text(data: bytes) -> None:
    _read("text", ".md", data)


def html(data: bytes) -> None:
    _read("html", ".html", data)


def epub(data: bytes) -> None:
    _read("epub", ".epub", data)


def pdf(data: bytes) -> None:
    """The worker's extraction (what runs inside the limited child), then the parent's mapping."""
    from combllama.ingest import IngestError, IngestOptions
    from combllama.ingest import _pdf_worker as worker
    from combllama.ingest.pdf import build_document

    path = _scratch_file("doc.pdf", data)
    try:
        answer = worker.extract({"path": str(path), "password": None})
    except (MemoryError, RecursionError):
        return  # the worker reports these as a malformed PDF (limits of the child)
    except Exception:  # noqa: BLE001 - the worker turns any parser failure into a one-line answer
        return
    try:
        build_document("doc.pdf", "0" * 64, answer, IngestOptions())
    except IngestError:
        pass


def repo(data: bytes) -> None:
    """A folder built from the bytes: entries split on NUL; 'name\\x01content' is a file, 'L name\\x01target'
    a symlink, 'D name' a directory; names may hold '/', '..', dots and odd bytes."""
    from combllama import ingest
    from combllama.ingest import IngestError, IngestOptions

    root = _SCRATCH / "repo"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for entry in data.split(b"\0")[:64]:
        name, _, body = entry.partition(b"\x01")
        kind = name[:2]
        name = name[2:] if kind in (b"L ", b"D ") else name
        rel = os.fsdecode(name).strip("/")
        if not rel or "\x00" in rel:
            continue
        path = root / rel
        try:
            if not path.resolve().is_relative_to(root.resolve()):
                continue  # the tree builder itself must stay in the scratch folder
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == b"L ":
                path.symlink_to(os.fsdecode(body) or ".")
            elif kind == b"D ":
                path.mkdir(exist_ok=True)
            else:
                path.write_bytes(body)
        except (OSError, ValueError, RuntimeError):
            # a name the filesystem refuses, or (RuntimeError) a link loop met while placing an entry:
            # the builder skips the entry; the walker below still meets the loop itself
            continue
    try:
        ingest.load(root, IngestOptions(use_git=False))
    except IngestError:
        pass


TARGETS = {"manifest": manifest, "st_header": st_header, "chunk": chunk, "text": text, "html": html,
           "epub": epub, "pdf": pdf, "repo": repo}
