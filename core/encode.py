"""Ingest orchestration: Document → tokens → chunks → method.encode → memory bundle on disk.

Bounded, resumable and interruptible: chunks are committed as they are encoded; `should_stop` is
polled between chunks (Ctrl-C sets it), and a resume restores the encoder from the committed chunks
and never re-encodes one. Progress leaves through `on_progress`; nothing here prints.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .engine import is_out_of_memory, release_device_memory
from .errors import BadInputError, InterruptedError_, ResourceError
from .fast.pipeline import pipelined
from .memory.bundle import MemoryReader, MemoryWriter, replace_bundle
from .memory.format import canonical_json
from .memory.store import MemoryStore, check_name, name_from
from .methods.base import Method
from .model import LoadedModel
from .prompt import DEFAULT_SYSTEM, memory_prefix_ids
from .tokenize import Chunk, ids_sha256, plan_chunks, tokenize_document


@dataclass(frozen=True)
class EncodeConfig:
    chunk_tokens: int = 512
    reserve: int = 1024  # window positions kept free for questions, history and answers
    system: str = DEFAULT_SYSTEM
    commit_every: int = 8  # chunks between manifest commits (and at least every commit_seconds)
    commit_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise BadInputError(f"--chunk-tokens must be at least 16 (got {self.chunk_tokens})")
        if self.reserve < 16:
            raise BadInputError("reserve must be at least 16 tokens")


@dataclass(frozen=True)
class Progress:
    chunks_done: int
    chunks_total: int
    tokens_done: int  # memory tokens encoded so far (all runs)
    tokens_total: int
    tokens_this_run: int
    seconds: float  # this run


@dataclass
class IngestResult:
    name: str
    path: str
    reused: bool  # an identical memory existed; nothing was encoded
    resumed: bool
    tokens_encoded: int  # this run
    seconds: float
    stats: dict  # MemoryReader.stats() of the result
    skipped: list
    warnings: list

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens_encoded / self.seconds if self.seconds and self.tokens_encoded else None


@dataclass(frozen=True)
class MemoryPlan:
    ids: list[int]  # the memory sequence: template prefix + selected document tokens
    n_prefix: int
    doc_range: tuple[int, int]  # selected document tokens [a, b)
    doc_tokens: int
    spans: list[tuple[int, int]]  # chunk spans over `ids`
    sources: list[list]  # Document.span() parts of each chunk
    content_key: str
    header: dict


def plan_memory(loaded: LoadedModel, document, method: Method, config: EncodeConfig) -> MemoryPlan:
    """Tokenize once, let the method select, chunk, and describe the memory-to-be."""
    tok = tokenize_document(loaded.tokenizer, document.joined())
    prefix = memory_prefix_ids(loaded.tokenizer, config.system)
    a, b = method.select(len(prefix), len(tok.ids), loaded.window, config.reserve)
    ids = prefix + tok.ids[a:b]
    n_prefix = len(prefix)
    boundaries = frozenset(n_prefix + i - a for i in tok.line_starts if a <= i < b)
    spans = plan_chunks(len(ids), config.chunk_tokens, boundaries)
    sources = []
    for s, e in spans:
        d0, d1 = max(s - n_prefix, 0) + a, max(e - n_prefix, 0) + a
        sources.append(document.span(tok.offsets[d0][0], tok.offsets[d1 - 1][1]) if d1 > d0 else [])
    L, H, D = loaded.kv_shape
    header = {
        "model": {"fingerprint": loaded.fingerprint, "name": loaded.name, "n_layers": L, "n_kv_heads": H,
                  "head_dim": D, "window": loaded.window},
        "kv_dtype": str(loaded.dtype).removeprefix("torch."),
        "method": {"name": method.name, "version": method.version, "params": method.params()},
        "chunking": {"chunk_tokens": config.chunk_tokens, "reserve": config.reserve},
        # prefix_sha256 puts the whole framing (template, system text, DOC_OPEN) into the content key: a
        # memory encoded under another framing is re-encoded, never reused.
        "prompt": {"system_sha256": hashlib.sha256(config.system.encode()).hexdigest(), "prefix_tokens": n_prefix,
                   "prefix_sha256": ids_sha256(prefix)},
        "source": {"name": document.name, "kind": document.kind, "sha256": document.sha256,
                   "doc_tokens": len(tok.ids), "doc_start": a, "doc_end": b,
                   "skipped": [s.to_dict() for s in document.skipped][:1000], "warnings": document.warnings[:1000]},
        "positions": {"logical_length": len(ids), "layout": method.layout(len(ids), loaded.window, config.reserve)},
        "planned_chunks": len(spans),
    }
    key_parts = {k: header[k] for k in ("model", "kv_dtype", "method", "chunking", "prompt")}
    key_parts["source"] = document.sha256
    content_key = hashlib.sha256(canonical_json(key_parts)).hexdigest()
    header["content_key"] = content_key
    return MemoryPlan(ids, n_prefix, (a, b), len(tok.ids), spans, sources, content_key, header)


DISK_SLACK = 32 * 1024 * 1024  # manifest rewrites, directory entries, filesystem rounding


def disk_needed(plan: MemoryPlan, method: Method, loaded: LoadedModel, done_chunks: int = 0) -> int:
    """Bytes the rest of this ingest will write, estimated from the plan: the method's kept tokens ×
    every layer's K and V, the token ids, and one manifest entry (~2 KiB) per chunk."""
    L, H, D = loaded.kv_shape
    left = 1 - done_chunks / max(1, len(plan.spans))
    kv = method.memory_tokens(len(plan.ids)) * L * 2 * H * D * loaded.dtype.itemsize
    return int(kv * left) + 4 * len(plan.ids) + 2048 * len(plan.spans)


def check_disk(root: Path, need: int, name: str) -> None:
    """ResourceError before a long ingest that would not fit on the disk of `root`."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_SLACK > free:
        raise ResourceError(f"not enough disk space for memory {name!r}: it needs about {need / 2**20:,.1f} MiB "
                            f"and {free / 2**20:,.1f} MiB are free on {probe}; free some space, set "
                            f"COMBLLAMA_MEMORY_DIR to a larger disk, or use a compressing method or --budget")


def ingest(loaded: LoadedModel, document, method: Method, store: MemoryStore, *, name: str | None = None,
           config: EncodeConfig = EncodeConfig(), resume: bool = False, force: bool = False,
           on_progress: Callable[[Progress], None] | None = None,
           should_stop: Callable[[], bool] | None = None, plan: MemoryPlan | None = None) -> IngestResult:
    """Encode `document` into the memory `name` (default: from the document name) and seal it. `plan`: the
    plan_memory(...) of this document, method and config when the caller already made it."""
    plan = plan or plan_memory(loaded, document, method, config)
    name = check_name(name) if name else name_from(Path(document.name.rstrip("/")).stem or document.name)
    root = store.path(name)
    t0 = time.perf_counter()
    result = lambda reader, n, resumed, reused: IngestResult(  # noqa: E731
        name, str(root), reused, resumed, n, time.perf_counter() - t0, reader.stats(), document.skipped,
        document.warnings)

    expect = {k: plan.header[k] for k in ("model", "method", "chunking", "prompt", "content_key")}
    staging = None
    if store.exists(name):
        existing = MemoryReader(root)
        same = existing.manifest.get("content_key") == plan.content_key
        if same and existing.complete and not force:
            return result(existing, 0, False, True)
        if not existing.complete and resume and same:
            check_disk(root, disk_needed(plan, method, loaded, len(existing.manifest["chunks"])), name)
            writer = MemoryWriter.resume(root, expect)
        elif force:
            # The old memory stays usable until the new one is sealed: encode into a hidden staging
            # bundle, then swap the two with renames (replace_bundle). A crash or Ctrl-C keeps the old one.
            staging = store.clear_leftovers(name)
            check_disk(root, disk_needed(plan, method, loaded), name)
            writer = MemoryWriter.create(staging, {"name": name, **plan.header}, plan.ids)
        elif not existing.complete:
            raise BadInputError(f"an interrupted ingest of {name!r} exists"
                                + ("" if same else " with other content or settings")
                                + "; pass --resume to continue it or --force to start over")
        else:
            raise BadInputError(f"a memory named {name!r} already exists (other content or settings); "
                                f"choose another --name or pass --force to replace it")
    else:
        check_disk(root, disk_needed(plan, method, loaded), name)
        writer = MemoryWriter.create(root, {"name": name, **plan.header}, plan.ids)

    # On CUDA, chunk i is written by a background thread while chunk i+1 computes (core/fast/pipeline.py).
    with pipelined(writer, loaded.device) as writer:
        resumed = writer.next_seq > 0
        encoder = method.encoder(loaded.model, len(plan.ids), config.reserve)
        chunks = [Chunk(i, s, e, tuple(plan.ids[s:e])) for i, (s, e) in enumerate(plan.spans)]
        for record, tensors in writer.committed_chunks():
            chunk = chunks[record["seq"]]
            if record["tokens_sha256"] != chunk.tokens_sha256:
                raise BadInputError(f"{name}: committed chunk {chunk.seq} does not match the document; "
                                    f"ingest again without --resume")
            encoder.restore(chunk, tensors)
        done_before = chunks[writer.next_seq - 1].end if writer.next_seq else 0
        encoded, last_commit, pending = 0, time.perf_counter(), 0
        for chunk in chunks[writer.next_seq:]:
            if should_stop and should_stop():
                writer.commit()
                raise InterruptedError_(
                    f"interrupted: {name!r} is unchanged; run again with --force to replace it" if staging else
                    f"interrupted: {chunk.seq}/{len(chunks)} chunks of {name!r} saved; "
                    f"continue with `combllama ingest --resume` (same file and options)")
            oom = False
            try:
                tensors = encoder.encode(chunk)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                oom = True  # handled below: the exception's frames hold device tensors until it is gone
            if oom:
                writer.commit()
                encoder = tensors = None  # the raised error's traceback keeps this frame (and the cache) alive
                release_device_memory()
                kind = "GPU memory" if loaded.device.type == "cuda" else "memory"
                saved = (f"{name!r} is unchanged. Free {kind}, or" if staging else
                         f"{chunk.seq} chunks are saved. Free {kind} and continue with --resume, or start over")
                raise ResourceError(
                    f"out of {kind} encoding chunk {chunk.seq + 1}/{len(chunks)} of {name!r} (method {method.name}, "
                    f"{config.chunk_tokens} tokens per chunk); {saved} with --force and a smaller --chunk-tokens, "
                    f"a smaller --budget or a compressing --method")
            writer.add_chunk(chunk.start, chunk.end, chunk.tokens_sha256, plan.sources[chunk.seq], tensors)
            encoded += chunk.end - chunk.start
            pending += 1
            now = time.perf_counter()
            if pending >= config.commit_every or now - last_commit >= config.commit_seconds:
                writer.commit()
                last_commit, pending = now, 0
            if on_progress:
                on_progress(Progress(chunk.seq + 1, len(chunks), done_before + encoded, len(plan.ids), encoded,
                                     now - t0))
        writer.seal()
    if staging is not None:
        replace_bundle(staging, root)
    return result(MemoryReader(root, writer.manifest), encoded, resumed, False)


