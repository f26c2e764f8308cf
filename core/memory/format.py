"""Memory format v1: the manifest schema, its strict parser and the safetensors header pre-check.

A memory is a bundle directory:

    NAME/MANIFEST.json                      the single commit point (canonical JSON, below)
    NAME/tokens.safetensors                 the memory's token ids (int32 "ids"), for resume and checks
    NAME/chunks/NNNNNN-<sha12>.safetensors  one immutable file per chunk: the method's tensors
    NAME/tmp/                               staging, emptied on every open for writing
    NAME/LOCK                               writer lock (kernel-released)

Manifest fields: format, format_version, min_reader_version, required_features, created_by,
created_at, name, model {fingerprint, name, n_layers, n_kv_heads, head_dim, window}, kv_dtype,
method {name, version, params}, chunking {chunk_tokens}, prompt {system_sha256, prefix_tokens, prefix_sha256},
source {name, kind, sha256, doc_tokens, doc_start, doc_end, skipped, warnings}, content_key,
positions {logical_length, layout}, tokens {file, sha256, count}, chunks [{seq, start, end,
tokens_sha256, source, file, bytes, sha256, tensors {name: [dtype, shape]}}], ingest {state, next_seq,
planned}, manifest_sha256 (sha256 of the canonical JSON of every other field: a damaged manifest is
refused instead of served; manifests written before it existed have none and are still read).
A chunk exists only once a committed manifest lists it.

Readers check cheapest first and raise only the typed errors of core.errors. No torch here.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any

from ..errors import CorruptMemoryError, NotAMemoryError, UnsupportedVersionError

FORMAT = "combllama-memory"
FORMAT_VERSION = 1
KNOWN_FEATURES: frozenset[str] = frozenset()
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_CHUNKS = 200_000
MAX_TOKENS = 100_000_000
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors header of one chunk file
CHUNK_FILE = re.compile(r"^chunks/\d{6}-[0-9a-f]{12}\.safetensors$")
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise ValueError(f"{name} is not allowed")


def _depth(obj, limit: int, d: int = 0) -> None:
    if d > limit:
        raise ValueError("JSON nested too deeply")
    if isinstance(obj, dict):
        for v in obj.values():
            _depth(v, limit, d + 1)
    elif isinstance(obj, list):
        for v in obj:
            _depth(v, limit, d + 1)


def strict_json(data: bytes, what: str, error=CorruptMemoryError) -> Any:
    """Parse UTF-8 JSON rejecting duplicate keys, NaN/Infinity and excessive depth."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        _depth(obj, MAX_JSON_DEPTH)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{what}: not valid JSON ({e})") from None
    return obj


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


CHECKSUM = "manifest_sha256"
LAYOUTS = ("original", "compact")


def manifest_checksum(m: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in m.items() if k != CHECKSUM})).hexdigest()


def seal_manifest(m: dict) -> bytes:
    """The bytes a writer commits: canonical JSON with a fresh manifest_sha256."""
    body = {k: v for k, v in m.items() if k != CHECKSUM}
    return canonical_json({**body, CHECKSUM: manifest_checksum(body)})


def parse_manifest(data: bytes, where: str) -> dict:
    """Validate a manifest: what it is, whether we may read it, and whether it is self-consistent."""
    if data[:1] != b"{":
        raise NotAMemoryError(f"{where}: not a combllama memory (manifest is not a JSON object)")
    m = strict_json(data, where, NotAMemoryError)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise NotAMemoryError(f"{where}: not a combllama memory (format is {m.get('format') if isinstance(m, dict) else None!r})")
    version, min_reader = m.get("format_version"), m.get("min_reader_version", m.get("format_version"))
    if not isinstance(version, int) or not isinstance(min_reader, int):
        raise CorruptMemoryError(f"{where}: format_version missing or not an integer")
    if min_reader > FORMAT_VERSION:
        raise UnsupportedVersionError(f"{where}: written by a newer combllama (format {version}; this one reads "
                                      f"{FORMAT_VERSION}); upgrade combllama")
    required = m.get("required_features") or []
    if not isinstance(required, list) or not all(isinstance(f, str) for f in required):
        raise CorruptMemoryError(f"{where}: required_features is not a list of names")
    unknown = set(required) - KNOWN_FEATURES
    if unknown:
        raise UnsupportedVersionError(f"{where}: needs features this combllama lacks: {', '.join(sorted(unknown))}; upgrade")
    if CHECKSUM in m and m[CHECKSUM] != manifest_checksum(m):
        raise CorruptMemoryError(f"{where}: manifest checksum mismatch (MANIFEST.json is damaged)")
    _check_schema(m, where)
    return m


def _req(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CorruptMemoryError(f"{where}: inconsistent manifest: {msg}")


def _is_int(x, lo=0, hi=MAX_TOKENS) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_schema(m: dict, where: str) -> None:
    for key, typ in (("model", dict), ("method", dict), ("chunks", list), ("ingest", dict), ("positions", dict),
                     ("tokens", dict), ("source", dict)):
        _req(isinstance(m.get(key), typ), where, f"{key} missing or not a {typ.__name__}")
    _req(isinstance(m["model"].get("fingerprint"), str), where, "model.fingerprint missing")
    _req(isinstance(m["method"].get("name"), str), where, "method.name missing")
    _req(isinstance(m["method"].get("params", {}), dict), where, "method.params not an object")
    chunks = m["chunks"]
    _req(len(chunks) <= MAX_CHUNKS, where, f"{len(chunks)} chunks is over the cap of {MAX_CHUNKS}")
    count = m["tokens"].get("count")
    _req(_is_int(count), where, "tokens.count out of range")
    _req(_is_int(m["positions"].get("logical_length")), where, "positions.logical_length out of range")
    _req(m["positions"]["logical_length"] == count, where, "positions.logical_length differs from tokens.count")
    _req(m["positions"].get("layout", "original") in LAYOUTS, where, "positions.layout unknown")
    state = m["ingest"].get("state")
    _req(state in ("partial", "complete"), where, f"ingest.state {state!r}")
    prev_end = 0
    for i, c in enumerate(chunks):
        _req(isinstance(c, dict), where, f"chunk {i} is not an object")
        _req(c.get("seq") == i, where, f"chunk {i} has seq {c.get('seq')!r} (must be contiguous)")
        _req(_is_int(c.get("start")) and _is_int(c.get("end")) and c["start"] == prev_end and c["end"] > c["start"]
             and c["end"] <= count, where, f"chunk {i} token span {c.get('start')}..{c.get('end')} has a gap, overlap "
             f"or runs past {count}")
        prev_end = c["end"]
        tensors = c.get("tensors")
        _req(isinstance(tensors, dict), where, f"chunk {i} tensors missing")
        if c.get("file") is None:
            _req(not tensors, where, f"chunk {i} lists tensors but no file")
            continue
        _req(isinstance(c["file"], str) and CHUNK_FILE.match(c["file"]) is not None, where,
             f"chunk {i} file {c.get('file')!r} is not a chunk path")
        _req(_is_int(c.get("bytes"), 1, 1 << 40), where, f"chunk {i} byte size invalid")
        _req(isinstance(c.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", c["sha256"]) is not None, where,
             f"chunk {i} sha256 invalid")
        _req(c["file"].split("-")[1][:12] == c["sha256"][:12], where, f"chunk {i} file name does not match its hash")
        for name, spec in tensors.items():
            ok = (isinstance(name, str) and isinstance(spec, list) and len(spec) == 2 and spec[0] in DTYPES
                  and isinstance(spec[1], list) and len(spec[1]) <= 8 and all(_is_int(d, 0, 1 << 31) for d in spec[1]))
            _req(ok, where, f"chunk {i} tensor {name!r} has an invalid spec")
    if state == "complete":
        _req(prev_end == count, where, f"chunks cover {prev_end} of {count} tokens")
    _req(_is_int(m["ingest"].get("next_seq"), 0, MAX_CHUNKS) and m["ingest"]["next_seq"] == len(chunks), where,
         "ingest.next_seq does not match the chunk list")


def safetensors_header(data: bytes, where: str, size: int | None = None) -> dict:
    """Pre-parse a safetensors buffer's header before safetensors sees it: size caps, strict JSON
    (safetensors itself keeps the last of duplicate keys), offsets inside the buffer that tile it exactly
    (no overlap, no hole: the format's rule, which the zero-copy reader would not otherwise check). `data`
    may be only the file's first bytes (through the header) when `size`, the whole file's length, is given."""
    size = len(data) if size is None else size
    if len(data) < 8:
        raise CorruptMemoryError(f"{where}: truncated (no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > size - 8 or n > len(data) - 8:
        raise CorruptMemoryError(f"{where}: header length {n} is impossible for a {size}-byte file")
    header = strict_json(bytes(data[8:8 + n]), where)  # bytes: `data` may be a memoryview
    if not isinstance(header, dict):
        raise CorruptMemoryError(f"{where}: header is not an object")
    body = size - 8 - n
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = spec["data_offsets"]
            shape = spec["shape"]
            ok = (all(_is_int(x, 0, 1 << 62) for x in (a, b)) and isinstance(shape, list)
                  and all(_is_int(d, 0, 1 << 31) for d in shape))
            size = math.prod(shape) * DTYPES[spec["dtype"]] if ok else None
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:  # offsets and dims must be plain non-negative integers (found by atheris)
            raise CorruptMemoryError(f"{where}: tensor {name!r} has a malformed entry")
        if not (0 <= a <= b <= body and b - a == size):
            raise CorruptMemoryError(f"{where}: tensor {name!r} offsets {a}..{b} do not fit the file")
    end = 0
    for name, (a, b) in sorted(((k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"),
                               key=lambda kv: (kv[1][0], kv[1][1])):
        if a != end:  # two tensors sharing bytes would each read the other's data as its own
            raise CorruptMemoryError(f"{where}: tensor {name!r} starts at {a}, not at {end} "
                                     f"({'overlaps another' if a < end else 'leaves a hole'})")
        end = b
    if end != body:
        raise CorruptMemoryError(f"{where}: the tensors end at byte {end} of a {body}-byte data section")
    return header
