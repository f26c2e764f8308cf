"""`full`: the uncompressed KV cache of every memory token, in original positions — the oracle.

Encoding chunk i attends to the KV of chunks 0..i-1, so encode → disk → attach reproduces plain
full-context inference exactly. Stored per chunk: "k", "v" of shape [layers, kv_heads, tokens, head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError
from .base import Encoder, KVMemory, Method, Options, layer_kv, make_cache, prefill


class FullEncoder(Encoder):
    def __init__(self, model):
        self.model = model
        self.cache = make_cache([])

    def restore(self, chunk, tensors):
        for layer in range(tensors["k"].shape[0]):
            k = tensors["k"][layer][None].to(self.model.device, self.model.dtype)
            v = tensors["v"][layer][None].to(self.model.device, self.model.dtype)
            self.cache.update(k, v, layer)

    def encode(self, chunk):
        import torch

        prefill(self.model, list(chunk.ids), self.cache, chunk.start)
        n = self.model.config.num_hidden_layers
        ks = [layer_kv(self.cache, i)[0][0, :, chunk.start:chunk.end] for i in range(n)]
        vs = [layer_kv(self.cache, i)[1][0, :, chunk.start:chunk.end] for i in range(n)]
        return {"k": torch.stack(ks), "v": torch.stack(vs)}  # [L, H_kv, T, D]


def attach_kv_chunks(model, manifest, blocks) -> KVMemory:
    """Concatenate per-chunk [L, H, T, D] blocks into one cache on the model's device."""
    import torch

    ks, vs, spans, pos = [], [], [], 0
    for _, t in blocks:
        if not t:
            continue
        ks.append(t["k"])
        vs.append(t["v"])
        spans.append((pos, pos + t["k"].shape[2]))
        pos += t["k"].shape[2]
    if not ks:
        raise BadInputError(f"{manifest.get('name')}: the memory holds no tokens")
    dev, dt = model.device, model.dtype
    K, V = torch.cat(ks, dim=2), torch.cat(vs, dim=2)  # [L, H, T, D]
    kv = [(K[i][None].to(dev, dt), V[i][None].to(dev, dt)) for i in range(K.shape[0])]
    return KVMemory(make_cache(kv), manifest["positions"]["logical_length"], [K.shape[2]] * K.shape[0], spans)


class Full(Method):
    name = "full"
    summary = "uncompressed KV cache (the oracle); the document must fit the model's window"

    @dataclass(frozen=True)
    class Options(Options):
        pass

    def select(self, n_prefix, n_doc, window, reserve):
        if self.budget is not None and self.budget.of(n_doc) < n_doc:
            raise BadInputError("method full keeps every token; --budget needs a compressing method "
                                "(e.g. --method truncate)")
        if n_prefix + n_doc + reserve > window:
            raise BadInputError(
                f"the document is {n_doc:,} tokens; with the prompt and {reserve:,} tokens kept free for the chat "
                f"that exceeds the model's {window:,}-token window. Use --method truncate (keeps only the last "
                f"tokens that fit) or a compressing method")
        return 0, n_doc

    def encoder(self, model, total_tokens, reserve=0):
        return FullEncoder(model)

    def attach(self, model, manifest, blocks):
        self.check_memory(model, manifest)
        return attach_kv_chunks(model, manifest, self.checked_blocks(manifest, blocks))
