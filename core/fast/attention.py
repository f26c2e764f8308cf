"""One interface to the fused attention kernels: `attend` returns the output and its log-sum-exp.

The log-sum-exp lets the engine attend to a read-only memory and to the turn's own tokens in two
calls and merge them exactly (`merge`), so neither part needs a mask over the other. Backends:
PyTorch's flash and memory-efficient SDPA kernels (CUDA), its flash kernel for CPU, the `flash_attn`
package (FA2) or flash-attn-4 (`flash_attn.cute`) when importable, and an fp32 `math` reference.
`varlen` runs packed sequences through torch.nn.attention.varlen when present. Pure tensor code.
"""
from __future__ import annotations

import functools
import importlib
import inspect

BACKENDS = ("math", "cpu_flash", "sdpa_flash", "sdpa_efficient", "flash_attn", "flash_attn_4")


@functools.cache
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # an absent or broken optional kernel package means "not available"
        return None


def available(device_type: str, dtype) -> list[str]:
    """Backends usable for tensors of this device type and dtype, best first."""
    import torch

    if device_type != "cuda":
        return ["cpu_flash", "math"]
    half = dtype in (torch.float16, torch.bfloat16)
    out = []
    if half and _module("flash_attn.cute") is not None and torch.cuda.get_device_capability()[0] >= 9:
        out.append("flash_attn_4")
    if half and _module("flash_attn") is not None:
        out.append("flash_attn")
    if half:
        out.append("sdpa_flash")
    return out + ["sdpa_efficient", "math"]


def choose(device_type: str, dtype, prefer: str | None = None) -> str:
    """The backend `attend` uses: `prefer` when it is usable here, else the best available."""
    options = available(device_type, dtype)
    if prefer is not None:
        if prefer not in BACKENDS:
            raise ValueError(f"unknown attention backend {prefer!r} (known: {', '.join(BACKENDS)})")
        if prefer in options:
            return prefer
    return options[0]


def _group(q, n_kv: int, causal: bool):
    """Fold the query heads sharing a KV head into the query axis: [B, Hq, Lq, D] → [B, Hkv, G*Lq, D].

    Valid without a causal mask only (every query sees every key); K and V are then read once per
    KV head instead of being repeated G times."""
    B, Hq, Lq, D = q.shape
    G = Hq // n_kv
    if G == 1 or causal:
        return q, 1
    return q.reshape(B, n_kv, G * Lq, D), G


def _ungroup(out, lse, G: int, Lq: int):
    if G == 1:
        return out, lse
    B, Hkv, _, D = out.shape
    return out.reshape(B, Hkv * G, Lq, D), lse.reshape(B, Hkv * G, Lq)


def attend(q, k, v, *, scale: float, causal: bool = False, backend: str = "math"):
    """Softmax attention of q [B, Hq, Lq, D] over k, v [B, Hkv, Lk, D] (Hq a multiple of Hkv; query head
    h reads KV head h // (Hq / Hkv), as transformers' repeat_kv). `causal` needs Lq == Lk.

    Returns (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32)."""
    import torch

    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    if causal and Lq != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys ({Lq} vs {k.shape[2]})")
    if causal and Hq != Hkv:  # the grouped layout would break the per-position mask: repeat instead
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        Hkv = Hq
    qg, G = _group(q, Hkv, causal)
    if backend == "math":
        s = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*Lq, Lk]
        if causal:
            s = s.masked_fill(torch.ones(Lq, Lq, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
        lse = torch.logsumexp(s, -1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
    elif backend == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, 0.0, causal, scale=scale)
    elif backend == "sdpa_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qg, k, v, 0.0, causal, False, scale=scale)[:2]
    elif backend == "sdpa_efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qg, k, v, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
        lse = lse[..., :qg.shape[2]]  # the kernel pads the query axis of its log-sum-exp to a multiple of 32
    elif backend in ("flash_attn", "flash_attn_4"):
        # These take [B, L, H, D] and handle grouped heads themselves.
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        if backend == "flash_attn":
            out, lse, _ = _module("flash_attn").flash_attn_func(t(q), t(k), t(v), softmax_scale=scale, causal=causal,
                                                              return_attn_probs=True)
        else:
            out, lse = _module("flash_attn.cute").flash_attn_func(t(q), t(k), t(v), softmax_scale=scale,
                                                                causal=causal)[:2]
        return out.transpose(1, 2), lse.float()  # lse is already [B, H, Lq]
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return _ungroup(out, lse.float(), G, Lq)


@functools.cache
def _flash_args() -> frozenset:
    """Argument names of PyTorch's FlashAttention op (they grew across releases: seqused_k, num_splits)."""
    import torch

    try:
        return frozenset(a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments)
    except (AttributeError, RuntimeError):
        return frozenset()


def prefix_available(device_type: str, dtype) -> bool:
    """Whether `attend_prefix` runs as one fused kernel here (CUDA, half types, a FlashAttention op that
    takes seqused_k)."""
    import torch

    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and "seqused_k" in _flash_args()


def attend_prefix(q, k, v, n, cu_q, cu_k, *, scale: float, num_splits: int | None = None):
    """Decode attention of q [1, Hq, 1, D] over the first `n` entries of fixed buffers k, v [1, Hkv, N, D]
    (Hq a multiple of Hkv). `n` is an int32 [1] device tensor, so a captured graph serves every step; cu_q =
    [0, 1] and cu_k = [0, N] (int32, on the device) describe the one sequence to FlashAttention's varlen
    kernel, whose seqused_k reads only the first n keys: memory and turn in one launch, no mask, no merge.
    `num_splits` forces the split-KV factor where the op takes it (None: its own heuristic). Elsewhere
    (CPU, no such op) the fp32 math reference over k[:, :, :n]. Returns out [1, Hq, 1, D]."""
    import torch

    if not prefix_available(q.device.type, q.dtype):
        m = int(n.reshape(-1)[0])
        return attend(q, k[:, :, :m], v[:, :, :m], scale=scale, backend="math")[0]
    kw = {"seqused_k": n}
    if num_splits is not None and "num_splits" in _flash_args():
        kw["num_splits"] = num_splits
    t = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, L, D] → [L, H, D] (a view: strides are kept)
    out = torch.ops.aten._flash_attention_forward(t(q), t(k), t(v), cu_q, cu_k, 1, k.shape[2], 0.0, False, False,
                                                  scale=scale, **kw)[0]
    return out.transpose(0, 1)[None]  # [1, Hq, 1, D]


def merge(out_a, lse_a, out_b, lse_b):
    """Exact softmax attention over the union of two disjoint key sets from the parts' outputs
    [B, H, L, D] and log-sum-exps [B, H, L] (float32). An empty part has lse = -inf."""
    import torch

    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]  # [B, H, L, 1]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype), lse


def masked_tail(q, k, v, used, *, scale: float):
    """Attention of q [B, Hq, Lq, D] over the first `used` slots of fixed buffers k, v [B, Hkv, R, D],
    query i seeing slots < used - Lq + i + 1 (the turn's tokens are written in order). `used` is a 0-d
    device tensor, so a captured CUDA graph reads the current count. fp32 math: R is a turn, not a book.

    Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq] float32)."""
    import torch

    B, Hq, Lq, D = q.shape
    Hkv, R = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G, Lq, D)
    s = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, R]
    last = used - Lq + torch.arange(Lq, device=q.device)  # slot of each query's own token
    visible = torch.arange(R, device=q.device)[None, :] <= last[:, None]  # [Lq, R]
    s = s.masked_fill(~visible, -torch.inf)
    lse = torch.logsumexp(s, -1)  # [B, Hkv, G, Lq]
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float()[:, :, None])  # [B, Hkv, G, Lq, D]
    return out.reshape(B, Hq, Lq, D).to(q.dtype), lse.reshape(B, Hq, Lq)


def varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, scale: float, causal: bool = False):
    """Packed sequences: q [Tq, Hq, D], k, v [Tk, Hkv, D] with cumulative lengths cu_q, cu_k [n + 1] (int32).

    torch.nn.attention.varlen on CUDA when present (one launch for all sequences); otherwise each
    sequence through `attend`. Returns out [Tq, Hq, D]."""
    import torch

    mod = _module("torch.nn.attention.varlen") if q.is_cuda else None
    if mod is not None and hasattr(mod, "varlen_attn") and q.dtype in (torch.float16, torch.bfloat16):
        params = inspect.signature(mod.varlen_attn).parameters
        kw = {"scale": scale} if "scale" in params else {}
        if "enable_gqa" in params:
            kw["enable_gqa"] = q.shape[1] != k.shape[1]
        if "is_causal" in params:
            kw["is_causal"] = causal
        elif causal:
            kw["window_size"] = (-1, 0)
        if q.shape[1] == k.shape[1] or "enable_gqa" in params:
            return mod.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    backend = choose(q.device.type, q.dtype)
    outs = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qi = q[bq[i]:bq[i + 1]].transpose(0, 1)[None]  # [1, Hq, Lq, D]
        ki, vi = k[bk[i]:bk[i + 1]].transpose(0, 1)[None], v[bk[i]:bk[i + 1]].transpose(0, 1)[None]
        outs.append(attend(qi, ki, vi, scale=scale, causal=causal, backend=backend)[0][0].transpose(0, 1))
    return torch.cat(outs)
