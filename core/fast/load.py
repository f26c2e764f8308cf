"""Loading a persisted KV memory straight into a StaticKV: every chunk file is read and verified by a
pool of threads (size, sha256, header, shapes, finiteness: MemoryReader's own checks), and only when
all of them passed is device memory allocated and filled, chunk by chunk, without a host-side
concatenation. For methods whose chunks are plain [layers, kv_heads, tokens, head_dim] blocks.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..errors import BadInputError
from ..methods.base import KVMemory, make_cache
from .static_cache import StaticKV

BLOCK_METHODS = ("full", "truncate")  # chunks hold "k", "v" [L, H, T, D] in memory order


def loadable(manifest: dict) -> bool:
    return manifest["method"]["name"] in BLOCK_METHODS


def load_memory(reader, model, *, capacity: int = 1024, workers: int | None = None) -> KVMemory:
    """The memory of `reader` (already opened and checked against the model) as a KVMemory whose cache
    layers are views of a StaticKV with `capacity` turn slots (kept on the cache for core/fast)."""
    import torch

    m = reader.manifest
    if not loadable(m):
        raise BadInputError(f"{reader.name}: method {m['method']['name']!r} has no block layout for the fast loader")
    records = [r for r in m["chunks"] if r.get("file")]
    if not records:
        raise BadInputError(f"{reader.name}: the memory holds no tokens")
    # hashlib and file reads release the GIL: threads scale with cores on large chunk files.
    n = workers or min(16, os.cpu_count() or 1, len(records))
    with ThreadPoolExecutor(max_workers=n) as pool:
        blocks = list(pool.map(reader.chunk, records))  # raises the first CorruptMemoryError; no GPU yet
    L, H, _, D = blocks[0]["k"].shape
    total = sum(b["k"].shape[2] for b in blocks)
    dev, dt = model.device, model.dtype
    static = StaticKV.allocate(L, H, D, total, capacity, device=dev, dtype=dt)
    spans, at = [], 0
    with torch.no_grad():
        for b in blocks:
            t = b["k"].shape[2]
            for name, dst in (("k", static.k), ("v", static.v)):
                x = b[name].to(dev, non_blocking=True).to(dt)  # [L, H, T, D]: one transfer per chunk
                for layer in range(L):
                    dst[layer][0, :, at:at + t] = x[layer]
            spans.append((at, at + t))
            at += t
    cache = make_cache([(k, v) for k, v in zip(static.mem_k, static.mem_v)])
    static.cache = cache
    static._views()
    cache._combllama_static = static
    return KVMemory(cache, m["positions"]["logical_length"], [total] * L, spans)
