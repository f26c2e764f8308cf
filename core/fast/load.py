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
RING_BYTES = 1 << 30  # host pieces of the transfer pass, all together
PIECE_BYTES = 16 << 20  # a piece holds as many whole layers of one chunk's K or V as fit (at least one)


def loadable(manifest: dict) -> bool:
    return manifest["method"]["name"] in BLOCK_METHODS


def _pinned(n: int):
    """A page-locked uint8 host buffer (DMA to the GPU at full bus speed), or None when the host refuses."""
    import torch

    try:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:
        return None


def pool_map(fn, items, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _torch_dtype(name: str):
    """The torch dtype of a stored floating dtype name, None for any other."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(name)


def load_memory(reader, model, *, capacity: int = 1024, workers: int | None = None, pinned: bool | None = None,
                ring: int = 16, timings: dict | None = None) -> KVMemory:
    """The memory of `reader` (already opened and checked against the model) as a KVMemory whose cache
    layers are views of a StaticKV with `capacity` turn slots (kept on the cache for core/fast).

    Two passes, so that a fresh process never has to hold (and first-touch) the whole memory in host RAM:
    1. verify: every chunk file is streamed through a small per-thread buffer (size, sha256, header,
       names/dtypes/shapes) by a pool of threads; nothing is kept and nothing is allocated on the device;
    2. transfer: device buffers are allocated, and each chunk is read again, one (layer, K or V) block at
       a time, into one of `ring` reused host pieces (page-locked on CUDA unless `pinned` is False; at most
       RING_BYTES in all) and copied to the device while the next blocks are read. A block is used only if
       its file's identity (inode, size, mtime, ctime) is, before and after its read, the one pass 1 hashed;
       else the whole chunk is read again and hashed, so a change between the passes is caught.
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
    c = model.config
    L, H = c.num_hidden_layers, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for r in records:  # every block must fit the buffers: a mismatch is a corrupt memory, not a torch error
        k, v = r["tensors"].get("k"), r["tensors"].get("v")
        if not (k and v and list(k[1]) == list(v[1]) and len(k[1]) == 4 and (k[1][0], k[1][1], k[1][3]) == (L, H, D)
                and _torch_dtype(k[0]) and _torch_dtype(v[0])):
            raise CorruptMemoryError(f"{reader.name} chunk {r['seq']}: K/V shapes {k and k[1]} / {v and v[1]} "
                                     f"(dtypes {k and k[0]} / {v and v[0]}) do not fit the model ({L} layers, "
                                     f"{H} KV heads, head dim {D})")
    # Pass 2 moves blocks of whole layers of one chunk's K or V ([g, H, T, D]) through `ring` small reused
    # host pieces: a fresh process page-locks only those (pinning costs ~0.6 s per GB, done while pass 1
    # runs), not a buffer per chunk file. Sizes come from the manifest; pass 1 checks the files match it.
    layer_bytes = max(H * r["tensors"][x][1][2] * D * _torch_dtype(r["tensors"][x][0]).itemsize
                      for r in records for x in ("k", "v"))
    g = max(1, min(L, PIECE_BYTES // layer_bytes))  # layers per block
    piece = g * layer_bytes
    k = max(1, min(ring, RING_BYTES // piece))
    # hashlib and file reads release the GIL: threads scale with cores on large chunk files.
    n = workers or min(16, os.cpu_count() or 1, len(records))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as side:
        pinning = side.submit(lambda: [(_pinned(piece) if pinned else None) for _ in range(k)])
        known = list(pool_map(reader.check_chunk, records, n))  # raises the first CorruptMemoryError; no device memory
        bufs = pinning.result()
    t1 = time.perf_counter()
    total = sum(r["tensors"]["k"][1][2] for r in records)
    static = StaticKV.allocate(L, H, D, total, capacity, device=dev, dtype=dt)
    spans, at = [], 0
    for r in records:
        t = r["tensors"]["k"][1][2]
        spans.append((at, at + t))
        at += t
    layouts = list(pool_map(reader.block_layout, records, n))
    bufs = [b if b is not None else torch.frombuffer(bytearray(piece), dtype=torch.uint8) for b in bufs]
    done = [None] * k  # per piece: the event after which its last copy to the device has finished
    blocks = [(i, name, l0, min(L, l0 + g)) for i in range(len(records)) for name in ("k", "v") for l0 in range(0, L, g)]

    def read(b: int) -> bool:
        i, name, l0, l1 = blocks[b]
        j = b % k
        if done[j] is not None:
            done[j].synchronize()  # the piece's previous block is on the device
        offset, nbytes = layouts[i][name]
        return reader.read_block(records[i], known[i], offset + l0 * nbytes, bufs[j][:(l1 - l0) * nbytes])

    def put(i: int, name: str, l0: int, x) -> None:  # x [layers, H, T, D] on the host
        a, e = spans[i]
        dst = static.k if name == "k" else static.v
        x = x.to(dev, non_blocking=True)  # one transfer per block
        for layer in range(x.shape[0]):
            dst[l0 + layer][0, :, a:e] = x[layer]

    stale: set[int] = set()
    with ThreadPoolExecutor(max_workers=k) as readers, torch.no_grad():
        pending = {b: readers.submit(read, b) for b in range(min(k, len(blocks)))}
        for b, (i, name, l0, l1) in enumerate(blocks):
            fresh = pending.pop(b).result()
            j = b % k
            done[j] = None
            if i not in stale and not fresh:
                # The file changed since pass 1 hashed it: read the whole chunk again, hashed (a corrupt one raises).
                stale.add(i)
                whole = reader.chunk(records[i], None, False)
                put(i, "k", 0, whole["k"])
                put(i, "v", 0, whole["v"])
            elif i not in stale:
                spec = records[i]["tensors"][name]
                t = spec[1][2]
                x = bufs[j][:(l1 - l0) * layouts[i][name][1]].view(_torch_dtype(spec[0])).view(l1 - l0, H, t, D)
                put(i, name, l0, x)
                if dev.type == "cuda":
                    done[j] = torch.cuda.Event()
                    done[j].record()
            if b + k < len(blocks):
                pending[b + k] = readers.submit(read, b + k)
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


def attach_reader(reader, loaded, *, fast: bool | None = None, timings: dict | None = None) -> KVMemory:
    """The memory of `reader` attached to `loaded`'s model, checked first (fingerprint, then whether it fits
    the device, before any tensor is read): through load_memory where it applies (a block-layout memory on
    CUDA, or `fast` True; `timings` as there), else through the method's own attach."""
    from ..methods import from_manifest

    reader.check_model(loaded.fingerprint)
    method = from_manifest(reader.manifest)
    method.check_resources(reader.manifest, loaded.device, loaded.dtype)
    if fast is None:
        fast = loaded.device.type == "cuda"
    if fast and loadable(reader.manifest):
        if loaded.device.type != "cuda":
            return load_memory(reader, loaded.model, timings=timings)
        from .decode import warm_up

        with ThreadPoolExecutor(max_workers=1) as side:  # the device is idle while pass 1 reads and hashes
            warm = side.submit(warm_up, loaded.model)
            memory = load_memory(reader, loaded.model, timings=timings)
            warm.result()
        return memory
    return method.attach(loaded.model, reader.manifest, reader.chunks())
