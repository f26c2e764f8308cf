"""Preallocated K/V buffers for answering from a memory: per layer, the memory (written once) and a
fixed-size turn buffer (question + answer) with a write index.

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
    # Exactly a DynamicCache: a subclass (an offloaded or selecting cache) has its own reading logic.
    if type(cache) is not DynamicCache or getattr(cache, "attention_kwargs", None):
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
    """mem_k[l], mem_v[l]: [1, kv_heads, M, head_dim]; tail_k[l], tail_v[l]: [1, kv_heads, R, head_dim];
    `used` slots of the tail hold this turn's tokens (a host int mirrored in `used_t`, a 0-d device
    tensor that captured graphs read)."""

    mem_k: list[Any]
    mem_v: list[Any]
    tail_k: list[Any]
    tail_v: list[Any]
    used_t: Any
    used: int = 0
    generation: int = field(default=0)  # bumped when buffers are reallocated (captured graphs go stale)

    @property
    def memory_length(self) -> int:
        return self.mem_k[0].shape[2]

    @property
    def capacity(self) -> int:
        return self.tail_k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.mem_k, *self.mem_v, *self.tail_k, *self.tail_v))

    @classmethod
    def allocate(cls, n_layers: int, kv_heads: int, head_dim: int, memory_length: int, capacity: int, *,
                 device, dtype) -> "StaticKV":
        """Empty buffers; the caller fills mem_k/mem_v (e.g. straight from disk, see fast/load.py)."""
        import torch

        shape_m, shape_t = (1, kv_heads, memory_length, head_dim), (1, kv_heads, capacity, head_dim)
        new = lambda shape: [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]  # noqa: E731
        # Turn slots start at zero: a masked slot gets weight 0, and 0 × (an uninitialised NaN) is NaN.
        zeros = lambda shape: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]  # noqa: E731
        return cls(new(shape_m), new(shape_m), zeros(shape_t), zeros(shape_t),
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
        st = cls.allocate(len(cache.layers), k0.shape[1], k0.shape[3], 0, capacity, device=k0.device,
                          dtype=k0.dtype)
        st.mem_k, st.mem_v = [], []
        for lay in cache.layers:
            k, v = lay.keys[:, :, :n].contiguous(), lay.values[:, :, :n].contiguous()
            lay.keys, lay.values = k, v  # the old (possibly longer) tensors are freed here
            st.mem_k.append(k)
            st.mem_v.append(v)
        if not st.mem_k[0].is_cuda:
            return st
        torch.cuda.empty_cache()  # hand the freed copies back before anything else allocates
        return st

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the turn buffers (rare: a turn longer than any before)."""
        import torch

        if capacity <= self.capacity:
            return
        shape = (*self.tail_k[0].shape[:2], capacity, self.tail_k[0].shape[3])
        like = self.tail_k[0]
        self.tail_k = [torch.zeros(shape, device=like.device, dtype=like.dtype) for _ in self.tail_k]
        self.tail_v = [torch.zeros(shape, device=like.device, dtype=like.dtype) for _ in self.tail_v]
        self.reset()  # the new buffers hold no turn
        self.generation += 1

    def reset(self) -> None:
        """Cut back to the memory: the turn's slots are free again."""
        self.used = 0
        self.used_t.zero_()
