"""The corruption corpus: every way to damage a real memory bundle that §2/§4.6 of the reliability
research lists — truncations, bit flips, safetensors header and manifest mutations, hostile lengths,
duplicate keys, path escapes, NaN/Inf behind valid checksums, version bumps, pickles and special
files in place of data — each loaded the way a reader must load it (open → model check → every
file verified → only then the attach).

Outcomes: a typed error (a CombllamaError subclass), or accepted. Accepted is fine only when what a
reader would serve is unchanged; "untyped" and "silent" (accepted but different) are failures.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from combllama.core.memory.format import canonical_json, seal_manifest


@dataclass
class Case:
    target: str  # "manifest" | "chunk" | "tokens"
    kind: str  # family name for the report
    data: bytes | None = None  # new content of the target file
    setup: Callable[[Path], None] | None = None  # or: a change to the bundle (undone by restoring a copy)


class Pickled:
    """A pickle whose load would create a marker file (it must never be loaded)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _st_parts(data: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _st(header_json: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + body


def _rehash(bundle: Path, manifest: dict, seq: int, data: bytes) -> dict:
    """Write `data` as chunk `seq` with a manifest entry that matches it (checksums pass: only the
    content checks can refuse it)."""
    sha = hashlib.sha256(data).hexdigest()
    rel = f"chunks/{seq:06d}-{sha[:12]}.safetensors"
    (bundle / rel).write_bytes(data)
    m = json.loads(json.dumps(manifest))
    m["chunks"][seq].update(file=rel, sha256=sha, bytes=len(data))
    return m


def cases(bundle: Path, rng: random.Random, flips: int, random_cuts: int, head_cuts: int,
          cut_stride: int = 1) -> Iterator[Case]:
    manifest_bytes = (bundle / "MANIFEST.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    chunk_rel = manifest["chunks"][0]["file"]
    chunk = (bundle / chunk_rel).read_bytes()
    tokens = (bundle / "tokens.safetensors").read_bytes()
    n, header, body = _st_parts(chunk)

    # 1. Truncation: every `cut_stride`-th offset of the first `head_cuts` bytes (every offset of the
    #    8-byte length prefix), then random offsets.
    for target, data in (("chunk", chunk), ("tokens", tokens), ("manifest", manifest_bytes)):
        cuts = set(range(0, min(head_cuts, len(data)), cut_stride)) | set(range(min(9, len(data))))
        cuts |= {rng.randrange(len(data)) for _ in range(random_cuts)}
        for cut in sorted(cuts):
            yield Case(target, "truncate", data[:cut])
        yield Case(target, "append", data + b"\0")
    # 2. Single-bit flips.
    for target, data in (("chunk", chunk), ("tokens", tokens), ("manifest", manifest_bytes)):
        for _ in range(flips):
            i = rng.randrange(len(data) * 8)
            b = bytearray(data)
            b[i // 8] ^= 1 << (i % 8)
            yield Case(target, "bitflip", bytes(b))
    # 3. Hostile safetensors header lengths and header contents (checksums left stale or made valid).
    for length in (0, 1, 2 ** 62, 2 ** 64 - 1, len(chunk), len(chunk) - 7, n + 1, n - 1, 100 * 2 ** 20):
        yield Case("chunk", "header-length", struct.pack("<Q", length) + chunk[8:])
    for hj in (b"[]", b"null", b"1", b'"x"', b" " + chunk[8:8 + n - 1], b"{" * 10000, b'{"a": NaN}',
               chunk[8:8 + n].replace(b'"dtype":"F32"', b'"dtype":"F64"', 1),
               chunk[8:8 + n].replace(b'"shape":[', b'"shape":[1,', 1)):
        yield Case("chunk", "header-json", _st(hj, body))
    names = [k for k in header if k != "__metadata__"]
    dup = (b"{" + b",".join(json.dumps({k: header[k]})[1:-1].encode() for k in names) + b"," +
           json.dumps({names[0]: header[names[-1]]})[1:-1].encode() + b"}")
    yield Case("chunk", "duplicate-tensor-key", _st(dup, body))
    first = header[names[0]]
    overlap = dict(header)
    overlap[names[-1]] = dict(header[names[-1]], data_offsets=first["data_offsets"])
    yield Case("chunk", "overlapping-offsets", _st(json.dumps(overlap).encode(), body))
    huge = dict(header)
    huge[names[0]] = dict(first, shape=[2 ** 31] * 4)
    yield Case("chunk", "huge-shape", _st(json.dumps(huge).encode(), body))
    # The same hostile chunks with checksums that pass: only the parser and content checks remain.
    for kind, data in (("duplicate-tensor-key+sha", _st(dup, body)),
                       ("overlapping-offsets+sha", _st(json.dumps(overlap).encode(), body)),
                       ("huge-shape+sha", _st(json.dumps(huge).encode(), body)),
                       ("extra-tensor+sha", _extra_tensor(chunk)),
                       ("nan+sha", _poison(chunk, float("nan"))), ("inf+sha", _poison(chunk, float("inf"))),
                       ("dtype-f16+sha", _as_f16(chunk))):
        yield Case("manifest", kind, setup=lambda b, d=data: _write_manifest(b, _rehash(b, manifest, 0, d)))
    # 4. Manifest mutations.
    for key in sorted(manifest):
        m = dict(manifest)
        del m[key]
        yield Case("manifest", f"drop:{key}", seal_manifest(m))
    # Named mutations carry a valid manifest_sha256 (what a hostile author writes): the schema must refuse
    # them. The same mutation with the stale checksum is refused by the checksum.
    for mutate, kind in _manifest_mutations(manifest):
        m = json.loads(manifest_bytes)
        mutate(m)
        yield Case("manifest", kind, seal_manifest(m))
        yield Case("manifest", "stale-checksum", canonical_json(m))
    raw = manifest_bytes.decode()
    yield Case("manifest", "duplicate-key", (raw[:-1] + ',"format":"combllama-memory"}').encode())
    yield Case("manifest", "nan", raw.replace('"count":', '"count":NaN,"x":', 1).encode())
    yield Case("manifest", "deep", ("[" * 100_000 + "]" * 100_000).encode())
    deep = '{"format":"combllama-memory","a":' + "[" * 5000 + "]" * 5000 + "}"
    yield Case("manifest", "deep-object", deep.encode())
    yield Case("manifest", "not-utf8", b"{\xff\xfe}")
    yield Case("manifest", "empty", b"")
    yield Case("manifest", "bom", b"\xef\xbb\xbf" + manifest_bytes)
    yield Case("manifest", "space-first", b" " + manifest_bytes)
    # 5. Pickles renamed into place (their __reduce__ would create a marker file).
    marker = str(bundle.parent / "PICKLE-RAN")
    for target in ("manifest", "chunk", "tokens"):
        yield Case(target, "pickle", pickle.dumps(Pickled(marker)))
        yield Case(target, "pickle-protocol0", pickle.dumps(Pickled(marker), protocol=0))
    # 6. Special files and links where data should be.
    yield Case("chunk", "symlink-outside", setup=lambda b: _replace_with_link(b / chunk_rel, "/etc/passwd"))
    yield Case("chunk", "directory", setup=lambda b: _replace_with(b / chunk_rel, os.mkdir))
    yield Case("chunk", "fifo", setup=lambda b: _replace_with(b / chunk_rel, os.mkfifo))
    yield Case("chunk", "missing", setup=lambda b: (b / chunk_rel).unlink())
    yield Case("manifest", "symlink", setup=lambda b: _replace_with_link(b / "MANIFEST.json", "/etc/passwd"))
    yield Case("manifest", "fifo", setup=lambda b: _replace_with(b / "MANIFEST.json", os.mkfifo))
    yield Case("manifest", "directory", setup=lambda b: _replace_with(b / "MANIFEST.json", os.mkdir))
    yield Case("tokens", "fifo", setup=lambda b: _replace_with(b / "tokens.safetensors", os.mkfifo))


def _write_manifest(bundle: Path, m: dict) -> None:
    (bundle / "MANIFEST.json").write_bytes(seal_manifest(m))


def _replace_with(path: Path, make) -> None:
    path.unlink()
    make(path)


def _replace_with_link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _tensors(chunk: bytes) -> dict:
    from safetensors.torch import load

    return load(chunk)


def _poison(chunk: bytes, value: float) -> bytes:
    from safetensors.torch import save

    t = _tensors(chunk)
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[t[k].numel() // 2] = value
    return save(t)


def _as_f16(chunk: bytes) -> bytes:
    from safetensors.torch import save

    return save({k: v.half() if v.is_floating_point() else v for k, v in _tensors(chunk).items()})


def _extra_tensor(chunk: bytes) -> bytes:
    import torch
    from safetensors.torch import save

    t = _tensors(chunk)
    t["z_extra"] = torch.zeros(4)
    return save(t)


def _manifest_mutations(manifest: dict):
    c0 = "chunks"
    yield (lambda m: m[c0][0].update(file="../../etc/passwd")), "path:dotdot"
    yield (lambda m: m[c0][0].update(file="/etc/passwd")), "path:absolute"
    yield (lambda m: m[c0][0].update(file="chunks/../MANIFEST.json")), "path:inside-dotdot"
    yield (lambda m: m[c0][0].update(file=m[c0][-1]["file"])), "path:other-chunk"
    yield (lambda m: m["tokens"].update(file="../../etc/passwd")), "path:tokens"
    yield (lambda m: m.update(format_version=2, min_reader_version=2)), "version:2"
    yield (lambda m: m.update(format_version=10 ** 30, min_reader_version=10 ** 30)), "version:huge"
    yield (lambda m: m.update(format_version="1")), "version:string"
    yield (lambda m: m.update(format_version=1.0)), "version:float"
    yield (lambda m: m.update(format_version=None)), "version:null"
    yield (lambda m: m.update(format_version=2)), "version:2-readable"
    yield (lambda m: m.update(required_features=["quantum-keys"])), "feature:required"
    yield (lambda m: m.update(required_features="abc")), "feature:string"
    yield (lambda m: m.update(format="combllama-memory-2")), "format:other"
    yield (lambda m: m["tokens"].update(count=10 ** 12)), "hostile:tokens"
    yield (lambda m: m["tokens"].update(count=-1)), "hostile:negative"
    yield (lambda m: m["tokens"].update(bytes=10 ** 15)), "hostile:token-bytes"
    yield (lambda m: m["positions"].update(logical_length=10 ** 12)), "hostile:logical"
    yield (lambda m: m["positions"].update(logical_length=m["positions"]["logical_length"] + 1)), "shift:logical"
    yield (lambda m: m[c0][0].update(bytes=2 ** 40)), "hostile:chunk-bytes"
    yield (lambda m: m[c0][0]["tensors"].update(k=["F32", [2 ** 31] * 4])), "hostile:shape"
    yield (lambda m: m[c0][0]["tensors"].update(k=["F32", [-1]])), "hostile:negative-shape"
    yield (lambda m: m[c0][0]["tensors"].update(k=["F64", m[c0][0]["tensors"]["k"][1]])), "dtype:unknown"
    yield (lambda m: m[c0].extend([{"seq": len(m[c0]) + i} for i in range(200_001)])), "hostile:chunks"
    yield (lambda m: m[c0].append(dict(m[c0][-1], seq=len(m[c0])))), "chunks:duplicate-last"
    yield (lambda m: m[c0].insert(1, dict(m[c0][0]))), "chunks:duplicate-first"
    yield (lambda m: m[c0].reverse()), "chunks:reversed"
    yield (lambda m: m[c0].pop(0)), "chunks:drop-first"
    yield (lambda m: m[c0][0].update(start=1)), "span:gap"
    yield (lambda m: m[c0][0].update(end=m[c0][0]["end"] + 1)), "span:overlap"
    yield (lambda m: m[c0][-1].update(end=m["tokens"]["count"] + 1)), "span:past-end"
    yield (lambda m: m["ingest"].update(next_seq=0)), "ingest:next-seq"
    yield (lambda m: m["ingest"].update(state="sealed")), "ingest:state"
    yield (lambda m: m["model"].update(fingerprint="cmfp1:sha256:" + "0" * 64)), "model:fingerprint"
    yield (lambda m: m["model"].update(fingerprint=None)), "model:no-fingerprint"
    yield (lambda m: m["method"].update(name="no-such-method")), "method:unknown"
    yield (lambda m: m["method"].update(params={"nope": 1})), "method:params"
    yield (lambda m: m.update(chunks={})), "type:chunks"
    yield (lambda m: m.update(model=[])), "type:model"
    yield (lambda m: m[c0][0].update(sha256="0" * 64)), "sha:zero"


@dataclass
class CorpusResult:
    cases: int = 0
    by_kind: dict = field(default_factory=dict)  # kind → {outcome: count}
    errors: dict = field(default_factory=dict)  # typed error class → count
    accepted_identical: int = 0
    untyped: list = field(default_factory=list)
    silent: list = field(default_factory=list)
    attach_reached_on_error: int = 0
    pickle_ran: bool = False
    rss_growth_bytes: int = 0  # peak RSS (getrusage) over the run minus the peak before it
    rss_after_minus_before: int = 0  # resident set after the run minus before (leaks)
    max_traced_peak_bytes: int = 0  # largest Python allocation peak of one hostile case (tracemalloc)
    max_peak_per_input_byte: float = 0.0  # that peak (less 1 MiB) over the bytes the case actually holds
    largest_case_bytes: int = 0  # the largest damaged file of any case (e.g. a 200,001-chunk manifest)
    traced_cases: int = 0
    largest_file_bytes: int = 0
    bundle_bytes: int = 0
    slowest_case_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


SERVED = ("positions", "token count", "chunk spans", "fingerprint", "method", "id count", "token ids", "tensors")


def served(root: Path, fingerprint: str, attach: Callable) -> tuple:
    """What a reader serves from `root`: every check first, then (only then) the attach callback."""
    import torch

    from combllama.core.memory.store import MemoryStore

    reader = MemoryStore(root.parent).open(root)
    reader.check_model(fingerprint)
    from combllama.core.methods import from_manifest

    from_manifest(reader.manifest)  # the method and its options must be known
    ids = reader.token_ids()
    blocks = list(reader.chunks())
    attach(reader.manifest, blocks)
    m = reader.manifest
    digest = hashlib.sha256()
    for _, t in blocks:
        for k in sorted(t):
            digest.update(k.encode())
            digest.update(t[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return (m["positions"], m["tokens"]["count"], [(c["start"], c["end"]) for c in m["chunks"]],
            m["model"]["fingerprint"], m["method"], len(ids), hashlib.sha256(str(ids).encode()).hexdigest(),
            digest.hexdigest())


def run_corpus(bundle: Path, fingerprint: str, *, flips: int, random_cuts: int, head_cuts: int, cut_stride: int = 1,
               seed: int = 0, log=print) -> CorpusResult:
    """Apply every case to a scratch copy of `bundle` (restored after each) and load it."""
    from combllama.core.errors import CombllamaError

    rng = random.Random(seed)
    work = bundle.parent / f".corpus-{os.getpid()}" / bundle.name
    shutil.rmtree(work.parent, ignore_errors=True)
    shutil.copytree(bundle, work)
    pristine = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    manifest = json.loads((work / "MANIFEST.json").read_text())
    targets = {"manifest": Path("MANIFEST.json"), "chunk": Path(manifest["chunks"][0]["file"]),
               "tokens": Path("tokens.safetensors")}
    attached = []
    expected = served(work, fingerprint, lambda m, b: None)
    result = CorpusResult(bundle_bytes=sum(len(v) for v in pristine.values()),
                          largest_file_bytes=max(len(v) for v in pristine.values()))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resident0 = _resident()
    t0 = time.perf_counter()
    marker = work.parent / "PICKLE-RAN"
    for case in cases(work, rng, flips, random_cuts, head_cuts, cut_stride):
        if case.setup is not None:
            case.setup(work)
        else:
            (work / targets[case.target]).write_bytes(case.data)
        attached.clear()
        t = time.perf_counter()
        traced = case.kind not in ("truncate", "bitflip")  # the hostile ones; tracing all would be slow
        if traced:
            tracemalloc.start()
        try:
            got = served(work, fingerprint, lambda m, b: attached.append(True))
            outcome = "accepted" if got == expected else "silent"
            diff = [name for name, a, b in zip(SERVED, got, expected) if a != b]
        except CombllamaError as e:
            outcome = "typed"
            result.errors[type(e).__name__] = result.errors.get(type(e).__name__, 0) + 1
            result.attach_reached_on_error += bool(attached)
        except Exception as e:  # noqa: BLE001 - what the corpus hunts
            outcome = "untyped"
            result.untyped.append(f"{case.target}/{case.kind}: {type(e).__name__}: {str(e)[:200]}")
        size = len(case.data) if case.data is not None else result.largest_file_bytes
        result.largest_case_bytes = max(result.largest_case_bytes, size)
        if traced:
            peak = tracemalloc.get_traced_memory()[1]
            result.max_traced_peak_bytes = max(result.max_traced_peak_bytes, peak)
            result.max_peak_per_input_byte = max(result.max_peak_per_input_byte,
                                                 max(0, peak - 2 ** 20) / max(size, result.largest_file_bytes))
            result.traced_cases += 1
            tracemalloc.stop()
        result.slowest_case_s = max(result.slowest_case_s, time.perf_counter() - t)
        if outcome == "silent":
            result.silent.append(f"{case.target}/{case.kind}: serves another {', '.join(diff)}")
        result.accepted_identical += outcome == "accepted"
        result.cases += 1
        fam = result.by_kind.setdefault(f"{case.target}/{case.kind.split(':')[0]}", {})
        fam[outcome] = fam.get(outcome, 0) + 1
        # Restore exactly the pristine bundle (a setup may have added, removed or replaced files).
        if case.setup is not None or case.target == "manifest":
            _restore(work, pristine)
        else:
            (work / targets[case.target]).write_bytes(pristine[targets[case.target]])
        if result.cases % 5000 == 0:
            log(f"{result.cases} corruption cases")
    result.pickle_ran = marker.exists()
    result.rss_growth_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    result.rss_after_minus_before = _resident() - resident0
    result.seconds = time.perf_counter() - t0
    shutil.rmtree(work.parent, ignore_errors=True)
    return result


def _resident() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _restore(work: Path, pristine: dict) -> None:
    for p in sorted(work.rglob("*"), reverse=True):
        rel = p.relative_to(work)
        if p.is_symlink() or (p.is_file() and rel not in pristine) or (not p.is_dir() and not p.is_file()):
            p.unlink()
        elif p.is_dir() and rel not in pristine and not any(str(k).startswith(str(rel) + "/") for k in pristine):
            shutil.rmtree(p)
    for rel, data in pristine.items():
        path = work / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

