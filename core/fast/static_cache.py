"""Preallocated K/V buffers for answering from a memory: per layer one buffer holding the memory
(written once) followed by a fixed number of turn slots (question + answer), with a write index.

Nothing is concatenated or reallocated while answering, so a decode step has fixed shapes and
addresses (what a CUDA graph needs), and cutting a turn back to the memory is resetting the index.
The memory's DynamicCache keeps working: its layers become views of the same memory buffers, so the
memory lives on the device once. Knows nothing of models, files or text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def uniform_length(memory) -> int | None:
    """The common per-layer length of a plain KV memory, or None when this cache is not one the
    static path can serve (ragged layers, per-head masks, missing layers)."""
    from transformers import DynamicCache

    cache = memory.cache
    # Exactly a DynamicCache: a subclass (an offloaded or selecting cache) has its own reading logic. Forward
    # keywords (per-head masks) are read by transformers' layers only, unless the memory offers a pre_layer.
    if type(cache) is not DynamicCache or (getattr(cache, "attention_kwargs", None) and memory.pre_layer() is None):
        return None
    lengths = set(memory.lengths)
    if len(lengths) != 1:
        return None
    n = lengths.pop()
    for lay in cache.layers:
        if lay.keys is None or lay.keys.shape[0] != 1 or lay.keys.shape[-2] < n or lay.values.shape[-2] < n:
            return None
    return n


@dataclass
class StaticKV:
    """Per layer one buffer k[l], v[l]: [1, kv_heads, M + R, head_dim] — the memory in [0, M), then R turn
    slots. mem_k/mem_v and tail_k/tail_v are views of it, so one fused kernel can read the memory and the
    turn together (over the first M + used entries) and nothing is copied to join them. `used` slots hold
    this turn's tokens (a host int mirrored in `used_t`, a 0-d device tensor that captured graphs read).
    `cache`: the DynamicCache whose layers view the memory part (re-pointed when buffers grow)."""

    k: list[Any]
    v: list[Any]
    memory_length: int
    used_t: Any
    used: int = 0
    generation: int = field(default=0)  # bumped when buffers are reallocated (captured graphs go stale)
    cache: Any = None

    mem_k: list[Any] = field(init=False, repr=False)  # views [1, kv_heads, M, head_dim]
    mem_v: list[Any] = field(init=False, repr=False)
    tail_k: list[Any] = field(init=False, repr=False)  # views [1, kv_heads, R, head_dim]
    tail_v: list[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._views()

    def _views(self) -> None:
        M = self.memory_length
        self.mem_k, self.mem_v = [b[:, :, :M] for b in self.k], [b[:, :, :M] for b in self.v]
        self.tail_k, self.tail_v = [b[:, :, M:] for b in self.k], [b[:, :, M:] for b in self.v]
        if self.cache is not None:
            for lay, k, v in zip(self.cache.layers, self.mem_k, self.mem_v):
                lay.keys, lay.values = k, v

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] - self.memory_length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @classmethod
    def allocate(cls, n_layers: int, kv_heads: int, head_dim: int, memory_length: int, capacity: int, *,
                 device, dtype) -> "StaticKV":
        """Buffers with an uninitialised memory part (the caller fills mem_k/mem_v, e.g. straight from
        disk, see fast/load.py) and zeroed turn slots."""
        import torch

        def new():
            b = torch.empty((1, kv_heads, memory_length + capacity, head_dim), device=device, dtype=dtype)
            # Turn slots start at zero: a masked slot gets weight 0, and 0 × (an uninitialised NaN) is NaN.
            b[:, :, memory_length:].zero_()
            return b

        return cls([new() for _ in range(n_layers)], [new() for _ in range(n_layers)], memory_length,
                   torch.zeros((), dtype=torch.long, device=device))

    @classmethod
    def adopt(cls, memory, capacity: int) -> "StaticKV":
        """Move a plain KV memory into static buffers, one layer at a time (peak: one extra layer), and
        point the memory's DynamicCache at them."""
        import torch

        n = uniform_length(memory)
        if n is None:
            raise ValueError("this memory is not a plain cache of equal-length layers")
        cache = memory.cache
        k0 = cache.layers[0].keys
        ks, vs = [], []
        for lay in cache.layers:
            for src, dst in ((lay.keys, ks), (lay.values, vs)):
                b = torch.empty((1, src.shape[1], n + capacity, src.shape[3]), device=src.device, dtype=src.dtype)
                b[:, :, :n] = src[:, :, :n]
                b[:, :, n:].zero_()
                dst.append(b)
            lay.keys, lay.values = ks[-1][:, :, :n], vs[-1][:, :, :n]  # the old tensors are freed here
        st = cls(ks, vs, n, torch.zeros((), dtype=torch.long, device=k0.device), cache=cache)
        if k0.is_cuda:
            del k0
            torch.cuda.empty_cache()  # hand the freed copies back before anything else allocates
        return st

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the turn slots (rare: a turn longer than any before): each layer's buffer is rebuilt in
        turn (peak: one extra layer) and the cache re-pointed; captured graphs go stale."""
        import torch

        if capacity <= self.capacity:
            return
        M = self.memory_length
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                b = torch.empty((1, old.shape[1], M + capacity, old.shape[3]), device=old.device, dtype=old.dtype)
                b[:, :, :M] = old[:, :, :M]
                b[:, :, M:].zero_()
                bufs[i] = b
        self._views()
        self.reset()  # the new buffers hold no turn
        self.generation += 1

    def reset(self) -> None:
        """Cut back to the memory: the turn's slots are free again."""
        self.used = 0
        self.used_t.zero_()
