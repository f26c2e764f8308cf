"""Citations: which chunks of a memory an answer drew on, by the share of attention its tokens paid
to each chunk's KV entries. Pure tensor code; no text, no printing.

One extra forward of prompt + answer over the memory cache, with forward pre-hooks on the chosen
layers' self-attention: each hook recomputes the queries (q_proj + RoPE) from the hidden states it
receives and scores them against the keys (memory cache + the new tokens, causal), so it works with
any attention backend (SDPA and flash never return weights) and any KV method. The forward stops
after the last chosen layer, and the cache is cut back to the memory afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import BadInputError
from .methods.base import KVMemory, trim_cache


@dataclass(frozen=True)
class CiteOptions:
    layers: tuple[int, ...] | None = None  # decoder layers scored; None: the upper half of the model
    min_share: float = 0.10  # a chunk is cited when it holds this share of the attention paid to the memory
    limit: int = 3  # at most this many sources (the first one is always given)
    query_block: int = 64  # answer tokens scored at once (bounds the [heads, block, memory] score tensor)

    def __post_init__(self) -> None:
        if not 0 <= self.min_share <= 1:
            raise BadInputError(f"min_share must be in [0, 1], got {self.min_share}")
        if self.limit < 1 or self.query_block < 1:
            raise BadInputError("limit and query_block must be at least 1")


class _Done(Exception):
    """Raised by the last hook: the layers above it are not needed."""


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The upper half of the decoder (retrieval-like heads sit there; layer 0-1 attend mostly locally)."""
    return tuple(range(n_layers // 2, n_layers))


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, H, T, D]; cos, sin: [B, T, D] → x rotated to its positions (HF rotate_half convention)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def memory_attention(q, k_mem, k_new, scaling: float, first_query: int, block: int = 64):
    """Mean share of attention each memory KV entry receives from the scored queries.

    q: [H, T, D] queries of the T new tokens (already rotated); k_mem: [Hkv, S, D] memory keys;
    k_new: [Hkv, T, D] keys of the new tokens. Query row t sees every memory key and new keys 0..t.
    Rows first_query..T-1 are scored. Returns [S] float32: per memory key, its attention probability
    averaged over heads and scored rows (the softmax runs over all keys, so the result sums to <= 1).
    """
    import torch

    H, T, D = q.shape
    Hkv, S = k_mem.shape[0], k_mem.shape[1]
    g = H // Hkv
    q = q.float().view(Hkv, g, T, D)  # [Hkv, G, T, D]
    k_mem, k_new = k_mem.float(), k_new.float()
    total = torch.zeros(S, dtype=torch.float32, device=q.device)
    rows = T - first_query
    for a in range(first_query, T, block):
        b = min(a + block, T)
        qb = q[:, :, a:b]  # [Hkv, G, t, D]
        s_mem = torch.einsum("hgtd,hsd->hgts", qb, k_mem) * scaling  # [Hkv, G, t, S]
        s_new = torch.einsum("hgtd,hsd->hgts", qb, k_new[:, :b]) * scaling  # [Hkv, G, t, b]
        causal = torch.arange(b, device=q.device)[None] > torch.arange(a, b, device=q.device)[:, None]  # [t, b]
        s_new = s_new.masked_fill(causal, float("-inf"))
        lse = torch.logsumexp(torch.cat([s_mem, s_new], dim=-1), dim=-1, keepdim=True)  # [Hkv, G, t, 1]
        total += torch.exp(s_mem - lse).sum(dim=(0, 1, 2))  # [S]
    return total / (H * rows)


def attention_mass(model, memory: KVMemory, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                   layers: Sequence[int] | None = None, block: int = 64):
    """[S_mem] mean share of attention the answer paid to each physical memory entry (layer 0's
    layout), averaged over heads, the chosen layers and the answer tokens.

    The scored queries are the ones that produced the answer: the last prompt token and every answer
    token but the last. Assumes every layer of the cache holds the same physical length.
    """
    import torch

    if not answer_ids:
        return torch.zeros(memory.lengths[0])
    decoder = model.model
    n_layers = len(decoder.layers)
    layers = tuple(sorted(set(layers if layers is not None else default_layers(n_layers))))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise BadInputError(f"citation layers must lie in 0..{n_layers - 1}")
    if len(set(memory.lengths)) != 1:
        raise BadInputError("citations need the same physical memory length in every layer")
    ids = list(prompt_ids) + list(answer_ids[:-1])
    first = len(prompt_ids) - 1
    S = memory.lengths[0]
    acc = torch.zeros(S, dtype=torch.float32)
    handles = []

    def hook(layer: int):
        def pre(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [1, T, hidden]
            cos, sin = kwargs["position_embeddings"]  # [1, T, D] each
            d = module.head_dim
            q = module.q_proj(h).view(*h.shape[:-1], -1, d).transpose(1, 2)  # [1, H, T, D]
            k = module.k_proj(h).view(*h.shape[:-1], -1, d).transpose(1, 2)  # [1, Hkv, T, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_mem = memory.cache.layers[layer].keys[0, :, :S]  # [Hkv, S, D]
            acc.add_(memory_attention(q[0], k_mem, k[0], module.scaling, first, block).cpu())
            if layer == layers[-1]:
                raise _Done
        return pre

    for i in layers:
        handles.append(decoder.layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True))
    device = model.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    pos = torch.arange(memory.logical_length, memory.logical_length + len(ids), device=device)[None]
    cpos = torch.arange(S, S + len(ids), device=device)
    try:
        with torch.inference_mode():
            decoder(input_ids=x, past_key_values=memory.cache, position_ids=pos, cache_position=cpos, use_cache=True)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
        trim_cache(memory.cache, memory.lengths)
    return acc / len(layers)


def span_shares(mass, spans: Sequence[tuple[int, int]]):
    """[n_spans]: each span's share of the attention paid to all spans (sums to 1 unless all zero).
    mass: [S] from attention_mass; spans: physical [a, b) ranges (e.g. chunks minus the prompt prefix)."""
    import torch

    sums = torch.stack([mass[a:b].sum() for a, b in spans]) if spans else torch.zeros(0)
    total = sums.sum()
    return sums / total if total > 0 else sums


def rank(shares, options: CiteOptions = CiteOptions()) -> list[tuple[int, float]]:
    """(span index, share) of the cited spans, best first: the top one always, the next ones while
    their share reaches `min_share`, at most `limit`."""
    order = sorted(range(len(shares)), key=lambda i: -float(shares[i]))
    out = []
    for i in order[:options.limit]:
        share = float(shares[i])
        if out and share < options.min_share:
            break
        if share > 0:
            out.append((i, share))
    return out
