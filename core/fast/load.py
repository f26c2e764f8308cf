"""Loading a persisted KV memory straight into a StaticKV: every chunk file is verified by a pool of
threads (size, sha256, header, shapes: MemoryReader's own checks), and only when all of them passed is
device memory allocated and filled, chunk by chunk, through a few reused (page-locked) host buffers and
without a host-side concatenation. For methods whose chunks are plain [layers, kv_heads, tokens,
head_dim] blocks.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import BadInputError
from ..methods.base import KVMemory, make_cache
from .static_cache import StaticKV

BLOCK_METHODS = ("full", "truncate")  # chunks hold "k", "v" [L, H, T, D] in memory order
RING_BYTES = 4 << 30  # host buffers of the transfer pass, all together


def loadable(manifest: dict) -> bool:
    return manifest["method"]["name"] in BLOCK_METHODS


def _pinned(n: int):
    """A page-locked uint8 host buffer (DMA to the GPU at full bus speed), or None when the host refuses."""
    import torch

    try:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:
        return None


def load_memory(reader, model, *, capacity: int = 1024, workers: int | None = None, pinned: bool | None = None,
                ring: int = 8, timings: dict | None = None) -> KVMemory:
    """The memory of `reader` (already opened and checked against the model) as a KVMemory whose cache
    layers are views of a StaticKV with `capacity` turn slots (kept on the cache for core/fast).

    Two passes, so that a fresh process never has to hold (and first-touch) the whole memory in host RAM:
    1. verify: every chunk file is streamed through a small per-thread buffer (size, sha256, header,
       names/dtypes/shapes) by a pool of threads; nothing is kept and nothing is allocated on the device;
    2. transfer: device buffers are allocated, and each chunk is read again into one of `ring` reused host
       buffers (page-locked on CUDA unless `pinned` is False; at most RING_BYTES in all) and copied to the
       device while the next chunks are read. A file whose identity (inode, size, mtime, ctime) is still the
       one pass 1 hashed is not hashed again; any other is, so a change between the passes is caught.
    Finiteness is checked where the values land, before the memory is returned. `timings` receives the
    seconds of each pass."""
    import torch

    from ..errors import CorruptMemoryError
    from ..memory.bundle import all_finite

    m = reader.manifest
    if not loadable(m):
        raise BadInputError(f"{reader.name}: method {m['method']['name']!r} has no block layout for the fast loader")
    records = [r for r in m["chunks"] if r.get("file")]
    if not records:
        raise BadInputError(f"{reader.name}: the memory holds no tokens")
    dev, dt = model.device, model.dtype
    pinned = dev.type == "cuda" if pinned is None else pinned and dev.type == "cuda"
    # hashlib and file reads release the GIL: threads scale with cores on large chunk files.
    n = workers or min(16, os.cpu_count() or 1, len(records))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        known = list(pool.map(reader.check_chunk, records))  # raises the first CorruptMemoryError; no device memory
    t1 = time.perf_counter()

    c = model.config
    L, H = c.num_hidden_layers, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for r in records:  # every block must fit the buffers: a mismatch is a corrupt memory, not a torch error
        k, v = r["tensors"].get("k"), r["tensors"].get("v")
        if not (k and v and list(k[1]) == list(v[1]) and len(k[1]) == 4 and (k[1][0], k[1][1], k[1][3]) == (L, H, D)):
            raise CorruptMemoryError(f"{reader.name} chunk {r['seq']}: K/V shapes {k and k[1]} / {v and v[1]} do not "
                                     f"fit the model ({L} layers, {H} KV heads, head dim {D})")
    total = sum(r["tensors"]["k"][1][2] for r in records)
    static = StaticKV.allocate(L, H, D, total, capacity, device=dev, dtype=dt)
    size = max(r["bytes"] for r in records)
    k = max(1, min(ring, len(records), RING_BYTES // size))
    bufs = [(_pinned(size) if pinned else None) for _ in range(k)]
    bufs = [b if b is not None else torch.frombuffer(bytearray(size), dtype=torch.uint8) for b in bufs]
    done = [None] * k  # per host buffer: the event after which its last copy to the device has finished
    spans, at = [], 0

    def read(i: int):
        j = i % k
        if done[j] is not None:
            done[j].synchronize()  # the buffer's previous chunk is on the device
        return readers.submit(reader.chunk, records[i], lambda nbytes: bufs[j][:nbytes], False, known[i])

    with ThreadPoolExecutor(max_workers=k) as readers, torch.no_grad():
        pending = {i: read(i) for i in range(k)}
        for i in range(len(records)):
            b = pending.pop(i).result()
            t = b["k"].shape[2]
            for name, dst in (("k", static.k), ("v", static.v)):
                x = b[name].to(dev, non_blocking=True).to(dt)  # [L, H, T, D]: one transfer per chunk
                for layer in range(L):
                    dst[layer][0, :, at:at + t] = x[layer]
            if dev.type == "cuda":
                done[i % k] = torch.cuda.Event()
                done[i % k].record()
            spans.append((at, at + t))
            at += t
            del b, x
            if i + k < len(records):
                pending[i + k] = read(i + k)
        if not all(all_finite(buf[:, :, :total]) for buf in (*static.k, *static.v)):
            del static
            raise CorruptMemoryError(f"{reader.name}: the memory holds NaN or Inf")
    if timings is not None:
        timings.update(verify_s=round(t1 - t0, 4), transfer_s=round(time.perf_counter() - t1, 4),
                       pinned=bool(pinned), workers=n, ring=k, bytes=sum(r["bytes"] for r in records))
    cache = make_cache([(k_, v_) for k_, v_ in zip(static.mem_k, static.mem_v)])
    static.cache = cache
    static._views()
    cache._combllama_static = static
    return KVMemory(cache, m["positions"]["logical_length"], [total] * L, spans)
