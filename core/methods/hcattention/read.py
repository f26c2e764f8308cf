"""HCAttention's read path: per-step selection over quantized keys and exact attention over the selection.

Per layer the store keeps, on the device, the key codes and codebooks of the memory's middle tokens and
the exact keys/values of its first `sinks` and last `recent` tokens; in host memory (pinned under CUDA)
the middle tokens' values and, with exact keys, their keys. Each step: lookup-table scores → per KV head,
the union over its query rows of the smallest token sets holding a τ share of the approximate attention
(resident tokens counted as kept) → those rows' keys/values either gathered to the device (async, in
pieces) or reduced on the host (softmax partials merged by log-sum-exp). With exact keys and `candidates` >
τ the approximate scores only nominate: a `candidates` share of them is read, their exact keys re-score them,
and the τ share of the exact attention is what the values are read for (coarse codes misjudge exactly the
sharp, needle-like attention that matters most). Knows nothing of files.

Registered with transformers' AttentionInterface as `combllama_hc`; without its `combllama_hc` kwarg it
falls back to the ragged SDPA path, so a model switched to it still serves every other memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .quant import approx_logits, dequantize_rows

ATTENTION = "combllama_hc"
SELECT_ELEMENTS = 1 << 25  # approximate probabilities binned at once during selection
BUCKETS, BUCKET_NATS = 1024, 1 / 32  # selection bins: 1/32 nat wide (×1.03 in probability), 32 nats deep
GATHER_MAX_BYTES = 256 << 20  # "auto" transfer: gather to the device below this, reduce on the host above
PIECES = 4  # host gathers overlapped with host→device copies


@dataclass
class HostRows:
    """Rows of one layer in host memory: data [H, n, D] (model dtype or int8), scale [H, n] float32 | None."""

    data: Any
    scale: Any = None

    def gather(self, flat_idx, out=None, out_scale=None):
        """Rows at flat indices into [H*n] → ([m, D], [m] | None); writes into `out` when given."""
        import torch

        H, n, D = self.data.shape
        rows = torch.index_select(self.data.view(H * n, D), 0, flat_idx, out=out) if out is not None else \
            torch.index_select(self.data.view(H * n, D), 0, flat_idx)
        scale = None
        if self.scale is not None:
            flat = self.scale.view(H * n)
            scale = torch.index_select(flat, 0, flat_idx, out=out_scale) if out_scale is not None else \
                torch.index_select(flat, 0, flat_idx)
        return rows, scale

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (0 if self.scale is None else self.scale.numel() * 4)


@dataclass
class Layer:
    """One layer of an attached memory. Middle tokens (selectable): codes [H, n, g] and codebooks [H, g, c, d]
    on the device, host_k/host_v rows in host memory, mid_valid [H, n] bool | None (False: padding of a
    shorter head). Resident exact tokens: res_k/res_v [H, m, D] on the device, res_valid [H, m] | None.
    Outliers: out_idx [H, o] int64 middle indices whose exact keys out_k [H, o, D] are on the device (their
    selection scores are exact, not looked up)."""

    codes: Any
    codebooks: Any
    host_v: HostRows
    host_k: HostRows | None
    res_k: Any
    res_v: Any
    mid_valid: Any = None
    res_valid: Any = None
    out_idx: Any = None
    out_k: Any = None

    def device_bytes(self) -> dict:
        b = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"codes": b(self.codes), "codebooks": b(self.codebooks),
                "exact": b(self.res_k) + b(self.res_v) + b(self.mid_valid) + b(self.res_valid),
                "outliers": b(self.out_idx) + b(self.out_k)}


@dataclass
class Store:
    """The attached memory's layers plus the read-path settings and the per-phase timings."""

    layers: list[Layer]
    tau: float
    transfer: str  # "gather" | "host" | "auto"
    exact_keys: bool
    dtype: Any
    candidates: float = 0.0  # > tau with exact keys: the approximate share read as candidates, then re-scored
    profile: bool = False  # synchronise around phases so `times` splits wall time (benchmarks only)
    times: dict = field(default_factory=lambda: {"selection": 0.0, "transfer": 0.0, "attention": 0.0})
    counts: dict = field(default_factory=lambda: {"selected": 0, "candidates": 0, "selectable": 0, "steps": 0,
                                                  "gather": 0, "host": 0})
    _staging: dict = field(default_factory=dict)
    _copy_event: Any = None
    _calls: int = 0  # layer reads by hc_attention
    _updates: int = 0  # layer updates of the tail cache (must be followed by a read, see method._hc_cache)

    def reset_stats(self) -> None:
        for k in self.times:
            self.times[k] = 0.0
        for k in self.counts:
            self.counts[k] = 0

    def _tick(self, device, name: str, t0: float) -> float:
        import torch

        if self.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        self.times[name] += t - t0
        return t

    def staging(self, key: str, shape, dtype):
        """A reusable pinned host buffer (pinned allocation is slow, so it is grown, never freed per step)."""
        import torch

        if self._copy_event is not None:
            self._copy_event.synchronize()  # the previous layer's copies read these buffers
        buf = self._staging.get(key)
        need = 1
        for s in shape:
            need *= s
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            buf = torch.empty(max(need, 1), dtype=dtype, pin_memory=True)
            self._staging[key] = buf
        return buf[:need].view(*shape)


def select(logits, resident_lse, tau: float):
    """Union over rows of the smallest sets holding a τ share of each row's attention, to within a bucket.

    logits [H, R, n] scaled approximate logits of the selectable tokens (-inf where invalid), resident_lse
    [H, R] log-sum-exp of each row's always-kept tokens (-inf if none) → mask [H, n] bool. Tokens are binned
    by log-probability (BUCKET_NATS wide, highest first) and binned mass is summed in one pass, no sort:
    every bin down to the one where the cumulative mass reaches the need is taken whole. That is a superset
    of the exact minimal set (select_exact) whose extra tokens lie within e^BUCKET_NATS of its smallest
    probability. A row whose resident tokens already hold τ selects nothing; τ >= 1 selects every valid
    token."""
    import torch

    H, R, n = logits.shape
    if tau >= 1.0:
        return torch.isfinite(logits).any(1)
    mask = torch.zeros(H, n, dtype=torch.bool, device=logits.device)
    rows = max(1, SELECT_ELEMENTS // max(1, H * n))
    for a in range(0, R, rows):
        z, res = logits[:, a:a + rows], resident_lse[:, a:a + rows]  # [H, r, n], [H, r]
        lse = torch.logaddexp(torch.logsumexp(z, -1), res)
        logp = z - lse[..., None]  # ≤ 0, -inf where invalid
        need = tau - (res - lse).exp()  # mass still to cover  [H, r]
        # bin 0 holds the highest probabilities; everything below -(BUCKETS - 1) × BUCKET_NATS shares the last
        b = (-logp / BUCKET_NATS).clamp_(0, BUCKETS - 1).long()
        mass = torch.zeros(*need.shape, BUCKETS, device=z.device).scatter_add_(-1, b, logp.exp())
        before = mass.cumsum(-1) - mass  # mass of the higher bins
        bins = (before < need[..., None]).sum(-1)  # bins needed: each one's higher bins hold less than the need
        mask |= ((b < bins[..., None]) & torch.isfinite(logp)).any(1)
    return mask


def select_exact(logits, resident_lse, tau: float):
    """The reference for `select`: the exact smallest set per row, by a full sort of every row (slow at a
    million tokens; tests and bench/hc_select.py compare against it)."""
    import torch

    H, R, n = logits.shape
    if tau >= 1.0:
        return torch.isfinite(logits).any(1)
    mask = torch.zeros(H, n, dtype=torch.bool, device=logits.device)
    for a in range(R):
        z, res = logits[:, a:a + 1], resident_lse[:, a:a + 1]
        lse = torch.logaddexp(torch.logsumexp(z, -1), res)
        p, order = torch.sort((z - lse[..., None]).exp(), dim=-1, descending=True)
        need = tau - (res - lse).exp()
        take = ((p.cumsum(-1) - p) < need[..., None]) & (p > 0)
        mask |= torch.zeros_like(take).scatter_(-1, order, take).any(1)
    return mask


def _padded_indices(mask):
    """mask [H, n] → (idx [H, k] int64 padded with 0, valid [H, k] bool), k = the largest selection; each
    row's selected positions first, in their original order (compacted from nonzero(), no sort)."""
    import torch

    H, n = mask.shape
    counts = mask.sum(-1)  # [H]
    k = int(counts.max()) if H else 0
    row, col = mask.nonzero(as_tuple=True)  # row-major: each row's positions ascending
    slot = torch.arange(row.numel(), device=mask.device) - (counts.cumsum(0) - counts)[row]
    idx = torch.zeros(H, k, dtype=torch.long, device=mask.device)
    idx[row, slot] = col
    valid = torch.arange(k, device=mask.device)[None] < counts[:, None]
    return idx, valid


def _gather_to_device(store: Store, rows: HostRows, flat_idx, device, dtype, key: str):
    """Host rows at flat_idx → [m, D] on `device`, dequantized to `dtype`. Under CUDA: index_select into a
    pinned staging buffer in PIECES, each piece's copy issued asynchronously on a side stream."""
    import torch

    if device.type != "cuda":
        r, s = rows.gather(flat_idx)
        return dequantize_rows(r, s, dtype)
    m, D = flat_idx.numel(), rows.data.shape[-1]
    buf = store.staging(key, (m, D), rows.data.dtype)
    sbuf = store.staging(key + "_s", (m,), torch.float32) if rows.scale is not None else None
    dev = torch.empty(m, D, dtype=rows.data.dtype, device=device)
    dev_s = torch.empty(m, dtype=torch.float32, device=device) if sbuf is not None else None
    stream = store._staging.setdefault("_stream", torch.cuda.Stream(device))
    step = max(1, -(-m // PIECES))
    for a in range(0, m, step):
        b = min(m, a + step)
        rows.gather(flat_idx[a:b], out=buf[a:b], out_scale=None if sbuf is None else sbuf[a:b])
        with torch.cuda.stream(stream):
            dev[a:b].copy_(buf[a:b], non_blocking=True)
            if sbuf is not None:
                dev_s[a:b].copy_(sbuf[a:b], non_blocking=True)
    event = torch.cuda.Event()
    event.record(stream)
    store._copy_event = event
    torch.cuda.current_stream(device).wait_event(event)
    return dequantize_rows(dev, dev_s, dtype)


def _host_partials(lay: Layer, q, sel_logits, flat_idx, valid, scaling: float):
    """Softmax partials of the selected rows computed on the host: (max [H, R], sum [H, R], out [H, R, D]).
    q [H, R, D] (exact keys) or sel_logits [H, R, k] (approximate weights) on the host."""
    import torch

    H, k = valid.shape
    if sel_logits is None:
        rk, sk = lay.host_k.gather(flat_idx)
        keys = dequantize_rows(rk, sk, torch.float32).view(H, k, -1)
        sel_logits = (q.float() @ keys.transpose(1, 2)) * scaling  # [H, R, k]
    sel_logits = sel_logits.masked_fill(~valid[:, None, :], -torch.inf)
    m = sel_logits.amax(-1).clamp(min=-1e30)  # [H, R]; finite even when a head selected nothing
    p = (sel_logits - m[..., None]).exp()
    rv, sv = lay.host_v.gather(flat_idx)
    vals = dequantize_rows(rv, sv, torch.float32).view(H, k, -1)
    return m, p.sum(-1), p @ vals


def read_layer(store: Store, li: int, query, key, value, scaling: float):
    """Attention of query [1, Hq, q, D] over layer li's memory plus the tail key/value [1, H, t, D] (the
    question and answer so far, exact, the last q of them being the queries) → [1, q, Hq, D]."""
    import torch

    lay = store.layers[li]
    dev = query.device
    _, Hq, q, D = query.shape
    H = key.shape[1]
    G = Hq // H
    t = key.shape[2]
    t0 = time.perf_counter()
    Q = query[0].float().reshape(H, G, q, D).reshape(H, G * q, D)  # [H, R, D], row = (group member, position)
    R = G * q
    # always-kept exact tokens: resident memory tokens, then the tail with a bottom-right causal mask
    rk = torch.cat([lay.res_k.float(), key[0].float()], 1)  # [H, m + t, D]
    rv = torch.cat([lay.res_v.float(), value[0].float()], 1)
    res_logits = (Q @ rk.transpose(1, 2)) * scaling  # [H, R, m + t]
    m_res = lay.res_k.shape[1]
    qi = torch.arange(q, device=dev).repeat(G)  # [R]
    allowed = torch.arange(t, device=dev)[None] <= (t - q) + qi[:, None]  # [R, t]
    allowed = torch.cat([torch.ones(R, m_res, dtype=torch.bool, device=dev), allowed], 1)[None]  # [1, R, m+t]
    if lay.res_valid is not None:
        allowed = allowed & torch.cat([lay.res_valid, lay.res_valid.new_ones(H, t)], 1)[:, None, :]
    res_logits = res_logits.masked_fill(~allowed, -torch.inf)
    n = lay.codes.shape[1]
    if n == 0:
        out = res_logits.softmax(-1) @ rv  # [H, R, D]
        t0 = store._tick(dev, "attention", t0)
        return out.reshape(H, G, q, D).reshape(Hq, q, D).transpose(0, 1)[None].to(query.dtype)

    approx = approx_logits(Q, lay.codebooks, lay.codes) * scaling  # [H, R, n]
    if lay.out_idx is not None:  # the worst-coded tokens are scored with their exact keys
        o = lay.out_idx.shape[1]
        approx.scatter_(2, lay.out_idx[:, None, :].expand(H, R, o), (Q @ lay.out_k.float().transpose(1, 2)) * scaling)
    if lay.mid_valid is not None:
        approx = approx.masked_fill(~lay.mid_valid[:, None, :], -torch.inf)
    res_lse = torch.logsumexp(res_logits, -1)  # [H, R]
    rescore = store.exact_keys and store.candidates > store.tau
    mask = select(approx, res_lse, store.candidates if rescore else store.tau)
    idx, valid = _padded_indices(mask)  # [H, k]
    k = idx.shape[1]
    store.counts["candidates"] += int(valid.sum())
    store.counts["selectable"] += H * n if lay.mid_valid is None else int(lay.mid_valid.sum())
    store.counts["steps"] += 1
    if k == 0:  # the resident tokens already hold τ in every row
        t0 = store._tick(dev, "selection", t0)
        out = res_logits.softmax(-1) @ rv
        store._tick(dev, "attention", t0)
        return out.reshape(H, G, q, D).reshape(Hq, q, D).transpose(0, 1)[None].to(query.dtype)
    sel_approx = None if store.exact_keys else approx.gather(2, idx[:, None, :].expand(H, R, k))  # [H, R, k]
    flat = (idx + torch.arange(H, device=dev)[:, None] * n).reshape(-1).cpu()  # host row indices
    valid_cpu = valid.cpu()
    t0 = store._tick(dev, "selection", t0)

    row_bytes = lay.host_v.data.shape[-1] * lay.host_v.data.element_size() * (2 if store.exact_keys else 1)
    mode = store.transfer
    if mode == "auto":
        mode = "gather" if dev.type != "cuda" or flat.numel() * row_bytes <= GATHER_MAX_BYTES else "host"
    store.counts[mode] += 1
    if mode == "gather":
        if store.exact_keys:
            sk = _gather_to_device(store, lay.host_k, flat, dev, torch.float32, "k").view(H, k, D)
            t0 = store._tick(dev, "transfer", t0)
            sel_logits = ((Q @ sk.transpose(1, 2)) * scaling).masked_fill(~valid[:, None, :], -torch.inf)
            if rescore:  # keep the τ share of the exact attention among the candidates; read only their values
                keep, kvalid = _padded_indices(select(sel_logits, res_lse, store.tau) & valid)  # [H, k2]
                idx, valid, k = idx.gather(1, keep), kvalid, keep.shape[1]
                sel_logits = sel_logits.gather(2, keep[:, None, :].expand(H, R, k)).masked_fill(~valid[:, None, :],
                                                                                             -torch.inf)
                flat = (idx + torch.arange(H, device=dev)[:, None] * n).reshape(-1).cpu()
                t0 = store._tick(dev, "selection", t0)
        else:
            sel_logits = sel_approx.masked_fill(~valid[:, None, :], -torch.inf)
        store.counts["selected"] += int(valid.sum())
        sv = _gather_to_device(store, lay.host_v, flat, dev, torch.float32, "v").view(H, k, D)
        t0 = store._tick(dev, "transfer", t0)
        p = torch.cat([sel_logits, res_logits], -1).softmax(-1)  # [H, R, k + m + t]
        out = p[..., :k] @ sv + p[..., k:] @ rv
    else:  # on the host every candidate is scored exactly anyway: nothing to save by re-selecting
        store.counts["selected"] += int(valid.sum())
        part = _host_partials(lay, Q.cpu() if store.exact_keys else None,
                              None if store.exact_keys else sel_approx.cpu(), flat, valid_cpu, scaling)
        m_s, l_s, o_s = (x.to(dev, non_blocking=True) for x in part)
        t0 = store._tick(dev, "transfer", t0)
        m_r = res_logits.amax(-1).clamp(min=-1e30)
        p_r = (res_logits - m_r[..., None]).exp()
        l_r, o_r = p_r.sum(-1), p_r @ rv
        mx = torch.maximum(m_s, m_r)
        a_s, a_r = l_s * (m_s - mx).exp(), l_r * (m_r - mx).exp()  # each side's share, unnormalised
        out = ((m_s - mx).exp()[..., None] * o_s + (m_r - mx).exp()[..., None] * o_r) / (a_s + a_r)[..., None]
    store._tick(dev, "attention", t0)
    return out.reshape(H, G, q, D).reshape(Hq, q, D).transpose(0, 1)[None].to(query.dtype)


def hc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, combllama_hc=None,
                 **kwargs):
    """transformers attention function: query [B, Hq, q, D], key/value [B, H, t, D] → ([B, q, Hq, D], None)."""
    if combllama_hc is None:
        from ..kvcompose import ragged_attention

        return ragged_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                **kwargs)
    if query.shape[0] != 1:
        raise NotImplementedError("hcattention memories serve batch size 1")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    combllama_hc._calls += 1
    return read_layer(combllama_hc, module.layer_idx, query, key, value, scale), None


def use_hc_attention(model) -> None:
    """Register `combllama_hc` (idempotent) and make `model` use it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, hc_attention)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
