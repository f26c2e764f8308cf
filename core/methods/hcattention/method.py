"""`hcattention` (arXiv 2507.19823, research/mission.md §4): keys product-quantized on the device, values
(and exact keys) in host memory, and per step only the tokens holding a τ share of the attention are read.

Encode: chunks prefill on top of the earlier ones (`exact`: every earlier token, = `full`; `anchor`: the
first chunk and the previous one, Star-Attention-like, bounded device memory). Codebooks (one per layer,
KV head and key group) are calibrated by k-means on `calib_tokens` post-RoPE keys drawn evenly from the
memory's first `calib_span` tokens (or on calibration ids, `calibrate_on`). Stored per chunk: "k", "v"
[L, H, T, D] (model dtype, or int8 with "k_scale"/"v_scale" [L, H, T] float32 when value_bits=8), "codes"
[L, H, T, g] once the codebooks exist, "codebooks" [L, H, g, c, d] float32 in the chunk that completed the
calibration (earlier chunks get their codes at attach).
Exact keys are kept on disk so a resumed ingest equals an uninterrupted one and τ=1 can be exact.

Attach streams chunks into preallocated device codes and host rows (one chunk in flight, never two copies),
after checking device and host memory. Per chunk and KV head, the `outliers` share of middle tokens whose codes
fit their keys worst keep their exact keys on the device and are scored exactly (a dense-and-sparse split, as
KVQuant keeps outlier values apart): a needle in a repetitive text is such a token, and coarse codes alone rank
it below the filler. The code width, centroids and recent window are planned to the budget (`plan_layout`).
Positions are the original ones: the document must fit the window.
`serve` attaches a `full`, `truncate` or `kvcompose` memory the same way (codebooks calibrated at attach).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Iterable

from ...errors import BadInputError, CorruptMemoryError, ResourceError
from ..base import FLOATS, Encoder, KVMemory, Method, Options, host_available, make_cache, prefill
from . import quant
from .read import HostRows, Layer, Store, use_hc_attention

DEFAULT_SHARE = 0.125  # GPU-resident memory / full bf16 KV cache when no --budget is given
SUB_DIMS = (1, 2, 4, 8, 16)  # key sub-vector widths tried by sub_dim=0, finest first
# Widths up to this one come before any coarser width, whatever centroids or window that costs: 8-wide codes
# miss a passkey even at τ = 0.99 (evals/results/hcattention-passkey-probe).
FINE_SUB_DIM = 4
RECENT_FLOOR = 4  # sub_dim=0 halves the recent window down to this on short documents to fit the budget
EXACT_PREFILL_TOKENS = 32768  # prefill="auto": exact attention to every earlier chunk up to this memory size


@dataclass(frozen=True)
class HCAttentionOptions(Options):
    tau: float = 0.9  # share of the attention read per step (1.0: exact attention)
    # with exact keys: the share of the *approximate* attention read as candidates and re-scored exactly, so τ
    # applies to exact scores (0.99 finds needles that τ over coarse codes misses; values are read for τ only)
    candidates: float = 0.99
    sub_dim: int = 0  # key sub-vector width d (g = head_dim / d codes per key); 0: the finest that fits the budget
    centroids: int = 256  # per codebook; <= 256 → 8-bit codes
    calib_tokens: int = 4096  # memory tokens whose keys calibrate the codebooks (16 per centroid at c=256)
    calib_span: int = 16384  # ... drawn evenly from this many first tokens (RoPE turns keys as positions grow)
    outliers: float = 0.02  # share of middle tokens per chunk and KV head scored with exact keys on the device
    kmeans_iters: int = 8
    seed: int = 0
    sinks: int = 4  # first memory tokens kept exact on the device
    recent: int = 128  # last memory tokens kept exact on the device
    exact_keys: bool = True  # host keeps exact keys: exact softmax over the selection; False: the paper's ã
    value_bits: int = 16  # 16: model dtype; 8: int8 rows with a per-row scale (disk and host)
    prefill: str = "auto"  # exact | anchor | auto (exact up to EXACT_PREFILL_TOKENS memory tokens)
    transfer: str = "auto"  # gather (to the device) | host (weighted sum on the host) | auto (by size)
    calibration: str = "document"  # "document" or "ids:<sha256>" (set by HCAttention.calibrate_on)

    def __post_init__(self) -> None:
        if not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise BadInputError(f"hcattention tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.candidates, (int, float)) or not 0 < self.candidates <= 1:
            raise BadInputError(f"hcattention candidates must be in (0, 1], got {self.candidates!r}")
        if self.sub_dim not in (0, *SUB_DIMS):
            raise BadInputError(f"hcattention sub_dim must be 0 (auto) or one of {SUB_DIMS}, got {self.sub_dim!r}")
        if not isinstance(self.centroids, int) or not 2 <= self.centroids <= 32768:
            raise BadInputError(f"hcattention centroids must be an integer in 2..32768, got {self.centroids!r}")
        for name, lo in (("calib_tokens", 1), ("calib_span", 1), ("kmeans_iters", 1), ("seed", 0), ("sinks", 0),
                         ("recent", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise BadInputError(f"hcattention {name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.outliers, (int, float)) or isinstance(self.outliers, bool) or not 0 <= self.outliers < 1:
            raise BadInputError(f"hcattention outliers must be a share in [0, 1), got {self.outliers!r}")
        if not isinstance(self.exact_keys, bool):
            raise BadInputError("hcattention exact_keys must be true or false")
        if self.value_bits not in (8, 16):
            raise BadInputError(f"hcattention value_bits must be 8 or 16, got {self.value_bits!r}")
        if self.prefill not in ("auto", "exact", "anchor"):
            raise BadInputError(f"hcattention prefill must be auto, exact or anchor, not {self.prefill!r}")
        if self.transfer not in ("auto", "gather", "host"):
            raise BadInputError(f"hcattention transfer must be auto, gather or host, not {self.transfer!r}")
        if self.calibration != "document" and not self.calibration.startswith("ids:"):
            raise BadInputError(f"hcattention calibration must be 'document' or 'ids:<sha256>', not {self.calibration!r}")


# --- accounting ------------------------------------------------------------------------------------------

def calibration_stride(tokens: int, o: HCAttentionOptions) -> tuple[int, int]:
    """(span, stride): the calibration sample is every stride-th of the memory's first `span` tokens."""
    span = min(o.calib_span, tokens)
    return span, max(1, -(-span // o.calib_tokens))


def outlier_count(middle: int, share: float) -> int:
    """Exactly scored tokens of a chunk's `middle` tokens (per KV head): at least one when the share is not 0."""
    return 0 if share <= 0 or middle <= 0 else min(middle, max(1, round(middle * share)))


def accounting(tokens: int, layers: int, kv_heads: int, head_dim: int, sub_dim: int, centroids: int,
               sinks: int, recent: int, exact_keys: bool = True, value_bits: int = 16, outliers: float = 0.0) -> dict:
    """Bytes of an attached memory against the full bf16 KV cache (2 × 2 bytes per key/value element).
    Device: codes of the middle tokens, fp16 codebooks, bf16 sinks + recent window, outliers' bf16 keys and
    int64 indices. Host: values (+ keys)."""
    exact = min(tokens, sinks + recent)
    mid = tokens - exact
    g = head_dim // sub_dim
    lh = layers * kv_heads
    codes = mid * lh * g * (1 if centroids <= 256 else 2)
    codebooks = lh * g * centroids * sub_dim * 2
    resident = exact * lh * head_dim * 2 * 2
    outlier = round(mid * outliers) * lh * (head_dim * 2 + 8)
    row = head_dim * 2 if value_bits == 16 else head_dim + 4
    host = mid * lh * row * (2 if exact_keys else 1)
    full = tokens * lh * head_dim * 2 * 2
    device = codes + codebooks + resident + outlier
    return {"full_bf16": full, "codes": codes, "codebooks": codebooks, "exact_window": resident,
            "outliers": outlier, "device": device, "host": host, "device_share": device / full if full else 0.0}


@dataclass(frozen=True)
class Layout:
    """The code geometry of one memory: key sub-vector width, centroids per codebook, recent window."""

    sub_dim: int
    centroids: int
    recent: int


def _halvings(top: int, floor: int) -> list[int]:
    out = [top]
    while out[-1] // 2 >= floor and out[-1] > floor:
        out.append(out[-1] // 2)
    return out


def plan_layout(target: float, tokens: int, layers: int, kv_heads: int, head_dim: int, o: HCAttentionOptions,
                sub_dim: int | None = None, centroids: int | None = None) -> Layout:
    """The most faithful layout whose device share fits `target` (sub_dim=0). Fine codes (width <= FINE_SUB_DIM)
    come first; among them the most centroids, and for those the longest recent window (halved down to
    RECENT_FLOOR); centroids are halved down to a sixteenth (on a document of a few hundred tokens the
    codebooks cost more than the codes). Only if no fine layout fits are coarser widths tried. On the
    harness, centroids matter more for finding a needle than the window does: at 1K tokens (4, 64, 16) finds
    the RULER needles that (4, 32, 32) misses. With sub_dim and centroids given (from a memory's codebooks)
    only the window is planned. If nothing fits: the coarsest layout."""
    widths = [d for d in SUB_DIMS if head_dim % d == 0] if sub_dim is None else [sub_dim]
    cents = _halvings(o.centroids, max(2, o.centroids // 16)) if centroids is None else [centroids]
    recents = _halvings(o.recent, min(o.recent, RECENT_FLOOR))
    order = [(d, c, r) for c in cents for r in recents for d in widths if d <= FINE_SUB_DIM]
    order += [(d, c, r) for d in widths if d > FINE_SUB_DIM for c in cents for r in recents]
    for d, c, r in order:
        share = accounting(tokens, layers, kv_heads, head_dim, d, c, o.sinks, r, outliers=o.outliers)["device_share"]
        if share <= target:
            return Layout(d, c, r)
    return Layout(widths[-1], cents[-1], recents[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_resources(device, need_device: dict, need_host: int) -> None:
    """Raise ResourceError, saying what to change, before anything is allocated."""
    import torch

    dev_total = sum(need_device.values())
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in need_device.items())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if dev_total > free:
            raise ResourceError(f"hcattention needs {_gib(dev_total)} of GPU memory for this memory ({parts}); "
                                f"{_gib(free)} is free. Use a coarser key code (a lower --budget or a larger "
                                f"sub_dim), fewer recent tokens, or a shorter document")
    else:
        need_host += dev_total
    avail = host_available()
    if avail is not None and need_host > avail:
        raise ResourceError(f"hcattention needs {_gib(need_host)} of host memory for values and exact keys "
                            f"({_gib(avail)} available). Use value_bits=8 "
                            f"(halves it), exact_keys=false (drops the host keys), or a shorter document")


# --- the attached memory -----------------------------------------------------------------------------------

def _hc_cache(n_layers: int, kv_heads: int, head_dim: int, device, dtype, store: Store):
    """An empty DynamicCache (one zero-length layer per model layer) that holds only the tail: the question
    and answer tokens. `attention_kwargs` (read by base.prefill) hands the store to `combllama_hc`."""
    import torch
    from transformers import DynamicCache

    class HCCache(DynamicCache):
        """Refuses to be read by any attention but `combllama_hc` (another memory attached later may have
        switched the model's attention; without this check the memory would silently be ignored)."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if store._updates != store._calls:
                store._updates = store._calls = 0
                raise BadInputError("this hcattention memory was read without its attention function (a memory "
                                    "attached later switched the model's attention); attach it again")
            store._updates += 1
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    empty = torch.zeros(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
    cache = HCCache(ddp_cache_data=[(empty, empty) for _ in range(n_layers)])
    cache.attention_kwargs = {"combllama_hc": store}
    return cache


@dataclass
class HCMemory(KVMemory):
    """A KVMemory whose cache holds only the tail; the memory itself lives in `store`. lengths are 0 (what
    the engine trims back to); logical_length is where positions continue."""

    store: Any = None
    accounts: dict | None = None

    def kv_entries(self) -> int:
        """Device-resident memory in KV entries of the full bf16 cache (what evals compares to full)."""
        a = self.accounts or {}
        per_entry = a.get("full_bf16", 0) / max(1, a.get("entries", 1))
        return int(round(a.get("device", 0) / per_entry)) if per_entry else 0


def _host_empty(shape, dtype, pin: bool):
    """Host rows, pinned when a GPU reads them (DMA at full speed); pageable if pinning is refused."""
    import torch

    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # pinned memory is capped on some hosts; pageable still works, slower
            pass
    return torch.empty(shape, dtype=dtype)


class _Builder:
    """Preallocates one memory's device codes and host rows, then takes token ranges layer by layer."""

    def __init__(self, model, lengths: list[int], o: HCAttentionOptions, g: int, centroids: int, host_dtype, pin: bool):
        import torch

        c = model.config
        self.H, self.D = c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.dev, self.dtype, self.o = model.device, model.dtype, o
        self.lengths = lengths
        self.spans = []  # per layer: (sinks s, middle end e)
        self.layers: list[dict] = []
        for N in lengths:
            s = min(o.sinks, N)
            e = max(s, N - o.recent)
            self.spans.append((s, e))
            n, m = e - s, s + N - e
            host = lambda: HostRows(  # noqa: E731
                _host_empty((self.H, n, self.D), host_dtype, pin),
                _host_empty((self.H, n), torch.float32, pin) if host_dtype == torch.int8 else None)
            self.layers.append({
                "codes": torch.empty(self.H, n, g, dtype=quant.code_dtype(centroids), device=self.dev),
                "host_v": host(), "host_k": host() if o.exact_keys else None,
                "res_k": torch.empty(self.H, m, self.D, dtype=self.dtype, device=self.dev),
                "res_v": torch.empty(self.H, m, self.D, dtype=self.dtype, device=self.dev),
                "mid_valid": None, "res_valid": None})
        self.outliers: list[tuple[list, list]] = [([], []) for _ in lengths]  # per layer: index and key pieces
        self.codebooks = None  # [L, H, g, c, d] fp16 on the device
        # (layer, a, b, exact keys [H, b-a, D] in the model dtype, codes or None) awaiting codebooks
        self.pending: list[tuple[int, int, int, Any, Any]] = []

    def put(self, li: int, a: int, b: int, k, v, k_scale=None, v_scale=None, codes=None, valid=None) -> None:
        """Tokens [a, b) of layer li: k/v [H, b-a, D] as stored (int8 with scales [H, b-a], or float), codes
        [H, b-a, g] or None (computed once codebooks exist), valid [H, b-a] bool or None."""
        import torch

        lay, (s, e) = self.layers[li], self.spans[li]
        N = self.lengths[li]
        m_pos = lambda x: x if x < s else x - (e - s)  # noqa: E731  (resident index of a non-middle token)
        for lo, hi in ((a, min(b, s)), (max(a, e), b)):  # sinks, recent window: exact on the device
            if lo < hi:
                ks = quant.dequantize_rows(k[:, lo - a:hi - a], None if k_scale is None else k_scale[:, lo - a:hi - a], self.dtype)
                vs = quant.dequantize_rows(v[:, lo - a:hi - a], None if v_scale is None else v_scale[:, lo - a:hi - a], self.dtype)
                lay["res_k"][:, m_pos(lo):m_pos(lo) + hi - lo] = ks.to(self.dev)
                lay["res_v"][:, m_pos(lo):m_pos(lo) + hi - lo] = vs.to(self.dev)
        lo, hi = max(a, s), min(b, e)
        if lo < hi:
            for rows, x, sc in ((lay["host_v"], v, v_scale), (lay["host_k"], k, k_scale)):
                if rows is None:
                    continue
                if rows.scale is not None and sc is None:  # float rows into int8 storage
                    qx, qs = quant.quantize_rows(x[:, lo - a:hi - a])
                    rows.data[:, lo - s:hi - s], rows.scale[:, lo - s:hi - s] = qx, qs
                elif rows.scale is None and sc is not None:
                    rows.data[:, lo - s:hi - s] = quant.dequantize_rows(x[:, lo - a:hi - a], sc[:, lo - a:hi - a], rows.data.dtype)
                else:
                    rows.data[:, lo - s:hi - s] = x[:, lo - a:hi - a]
                    if sc is not None:
                        rows.scale[:, lo - s:hi - s] = sc[:, lo - a:hi - a]
            cx = None if codes is None else codes[:, lo - a:hi - a].to(self.dev)
            if cx is not None:
                lay["codes"][:, lo - s:hi - s] = cx
            if cx is None or self.o.outliers > 0:  # flush needs the exact keys: to code them or to rank them
                kx = quant.dequantize_rows(k[:, lo - a:hi - a], None if k_scale is None else k_scale[:, lo - a:hi - a],
                                           self.dtype)
                self.pending.append((li, lo, hi, kx, cx))
        if valid is not None and not bool(valid.all()):
            for name, full_len, (x0, x1) in (("mid_valid", e - s, (lo, hi)),):
                if lay[name] is None:
                    lay[name] = torch.ones(self.H, full_len, dtype=torch.bool, device=self.dev)
                if x0 < x1:
                    lay[name][:, x0 - s:x1 - s] = valid[:, x0 - a:x1 - a].to(self.dev)
            if lay["res_valid"] is None:
                lay["res_valid"] = torch.ones(self.H, s + N - e, dtype=torch.bool, device=self.dev)
            for x0, x1 in ((a, min(b, s)), (max(a, e), b)):
                if x0 < x1:
                    lay["res_valid"][:, m_pos(x0):m_pos(x0) + x1 - x0] = valid[:, x0 - a:x1 - a].to(self.dev)
        self.flush()

    def set_codebooks(self, codebooks) -> None:
        import torch

        self.codebooks = codebooks.to(self.dev, torch.float16)  # fp16 on the device: half the bytes of fp32
        self.flush()

    def flush(self) -> None:
        """Once the codebooks exist: assign codes to ranges that arrived without them, and keep the exact keys
        of each range's worst-coded tokens (per KV head) as its outliers."""
        if self.codebooks is None:
            return
        for li, lo, hi, kx, codes in self.pending:
            s = self.spans[li][0]
            kx = kx.to(self.dev)
            if codes is None:
                codes = quant.encode_keys(kx[None], self.codebooks[li:li + 1])[0]  # [H, hi-lo, g]
                self.layers[li]["codes"][:, lo - s:hi - s] = codes
            m = outlier_count(hi - lo, self.o.outliers)
            if m:
                err = (quant.decode_keys(codes, self.codebooks[li]) - kx.float()).square_().sum(-1)  # [H, hi-lo]
                valid = self.layers[li]["mid_valid"]
                if valid is not None:
                    err.masked_fill_(~valid[:, lo - s:hi - s], -1.0)  # padding is never an outlier
                top = err.topk(m, -1).indices  # [H, m]
                self.outliers[li][0].append(top + (lo - s))
                self.outliers[li][1].append(kx.gather(1, top[..., None].expand(-1, -1, kx.shape[-1])))
        self.pending = []

    def finish(self, o: HCAttentionOptions) -> Store:
        if self.pending or self.codebooks is None:
            raise CorruptMemoryError("hcattention memory holds no codebooks (calibration chunk missing)")
        import torch

        layers = []
        for i, lay in enumerate(self.layers):
            idx, keys = self.outliers[i]
            out = {"out_idx": torch.cat(idx, 1), "out_k": torch.cat(keys, 1)} if idx else {}
            layers.append(Layer(codebooks=self.codebooks[i], **lay, **out))
        return Store(layers, o.tau, o.transfer, o.exact_keys, self.dtype, candidates=max(o.tau, o.candidates))


def _device_needs(lengths, H, D, G, g, centroids, o, dtype_bytes) -> dict:
    """Device bytes to allocate (and the largest per-layer selection workspace)."""
    code_b = 1 if centroids <= 256 else 2
    mids = [max(0, N - min(o.sinks, N) - o.recent) for N in lengths]
    codes = sum(mids) * H * g * code_b
    exact = sum(min(N, o.sinks + o.recent) for N in lengths) * H * D * 2 * dtype_bytes
    codebooks = len(lengths) * H * g * centroids * (D // g) * 2
    outliers = sum(round(n * o.outliers) for n in mids) * H * (D * dtype_bytes + 8)
    # selection of one layer at decode: logits, probabilities, sort values + int64 order, masks
    workspace = max(lengths) * H * G * 28
    return {"key codes": codes, "codebooks": codebooks, "exact sinks+recent": exact, "outlier keys": outliers,
            "selection workspace": workspace}


# --- encode ------------------------------------------------------------------------------------------------

class HCEncoder(Encoder):
    def __init__(self, method: "HCAttention", model, total_tokens: int):
        c = model.config
        self.model, self.o = model, method.options
        self.L, self.H = c.num_hidden_layers, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.layout = method.layout_for(total_tokens, self.L, self.H, self.D)
        self.sub_dim = self.layout.sub_dim
        o = self.o
        self.mode = o.prefill if o.prefill != "auto" else ("exact" if total_tokens <= EXACT_PREFILL_TOKENS else "anchor")
        self.cache = make_cache([])
        self.anchor: tuple | None = None  # anchor mode: first chunk's (k, v) [L, H, T, D]
        self.prev: tuple | None = None
        # the calibration sample: every stride-th token of the first `span` (the chunk reaching `span` calibrates)
        self.span, self.stride = calibration_stride(total_tokens, o)
        self.calib: list = []
        self.codebooks = None
        self.emit_codebooks = False
        if method.calibration_ids is not None:
            self.codebooks = self._calibrate_on(method.calibration_ids)
            self.emit_codebooks = True

    def _calibrate_on(self, ids: list[int]):
        import torch

        ids = list(ids)[:self.o.calib_tokens]
        if not ids:
            raise BadInputError("hcattention calibration text has no tokens")
        cache = make_cache([])
        step = 2048
        for a in range(0, len(ids), step):
            prefill(self.model, ids[a:a + step], cache, a)
        with torch.inference_mode():
            keys = torch.stack([cache.layers[i].keys[0] for i in range(self.L)])  # [L, H, T, D]
            return self._calibrate(keys)

    def _calibrate(self, keys):
        return quant.calibrate(keys, self.sub_dim, self.layout.centroids, self.o.kmeans_iters, self.o.seed)

    def _sample(self, k, start: int) -> None:
        """Keep this chunk's calibration tokens (positions in the span that are multiples of the stride)."""
        first = -(-start // self.stride) * self.stride
        end = min(start + k.shape[2], self.span)
        if first < end:
            self.calib.append(k[:, :, first - start:end - start:self.stride])

    def _stored(self, k, v) -> dict:
        if self.o.value_bits == 16:
            return {"k": k.contiguous(), "v": v.contiguous()}
        qk, sk = quant.quantize_rows(k)
        qv, sv = quant.quantize_rows(v)
        return {"k": qk, "k_scale": sk, "v": qv, "v_scale": sv}

    def _roundtrip(self, t: dict):
        dev, dt = self.model.device, self.model.dtype
        k = quant.dequantize_rows(t["k"].to(dev), t["k_scale"].to(dev) if "k_scale" in t else None, dt)
        v = quant.dequantize_rows(t["v"].to(dev), t["v_scale"].to(dev) if "v_scale" in t else None, dt)
        return k, v

    def _remember(self, k, v, fresh: bool) -> None:
        """Keep what later chunks attend to, exactly as stored (so a resume equals an uninterrupted run)."""
        T = k.shape[2]
        if self.mode == "exact":
            for i in range(self.L):
                if fresh:  # prefill already appended this chunk: replace it by its stored round trip
                    self.cache.layers[i].keys[0, :, -T:] = k[i]
                    self.cache.layers[i].values[0, :, -T:] = v[i]
                else:
                    self.cache.update(k[i][None], v[i][None], i)
        elif self.anchor is None:
            self.anchor = (k, v)
        else:
            self.prev = (k, v)

    def _prefill(self, chunk):
        import torch

        T = len(chunk.ids)
        if self.mode == "exact":
            cache = self.cache
        else:
            parts = [p for p in (self.anchor, self.prev) if p is not None]
            kv = [(torch.cat([p[0][i] for p in parts], 1)[None], torch.cat([p[1][i] for p in parts], 1)[None])
                  for i in range(self.L)] if parts else []
            cache = make_cache(kv)
        prefill(self.model, list(chunk.ids), cache, chunk.start)
        k = torch.stack([cache.layers[i].keys[0, :, -T:] for i in range(self.L)])  # [L, H, T, D]
        v = torch.stack([cache.layers[i].values[0, :, -T:] for i in range(self.L)])
        return k, v

    def _codes(self, k, start: int) -> dict:
        import torch

        if self.codebooks is not None:
            out = {"codes": quant.encode_keys(k, self.codebooks).cpu()}
            if self.emit_codebooks:
                out["codebooks"], self.emit_codebooks = self.codebooks.float().cpu(), False
            return out
        self._sample(k, start)
        if start + k.shape[2] < self.span:
            return {}
        keys = torch.cat(self.calib, 2)[:, :, :self.o.calib_tokens]
        self.codebooks, self.calib = self._calibrate(keys), []
        return {"codebooks": self.codebooks.float().cpu()}

    def restore(self, chunk, tensors):
        import torch

        with torch.inference_mode():
            k, v = self._roundtrip(tensors)
            self._remember(k, v, fresh=False)
            if "codebooks" in tensors:
                self.codebooks, self.calib, self.emit_codebooks = tensors["codebooks"].to(self.model.device), [], False
            elif self.codebooks is None:
                self._sample(k, chunk.start)

    def encode(self, chunk):
        import torch

        with torch.inference_mode():
            k, v = self._prefill(chunk)
            out = {name: t.cpu() for name, t in self._stored(k, v).items()}
            k, v = self._roundtrip(out)
            self._remember(k, v, fresh=True)
            out.update(self._codes(k, chunk.start))
        return out


# --- the method --------------------------------------------------------------------------------------------

class HCAttention(Method):
    name = "hcattention"
    summary = ("HCAttention: quantized keys on the GPU, values in host memory, per-step τ selection "
               "(--budget: GPU share, default 0.125)")
    Options = HCAttentionOptions

    def __init__(self, options=None, budget=None):
        super().__init__(options, budget)
        self.calibration_ids: list[int] | None = None

    def calibrate_on(self, ids: list[int]) -> "HCAttention":
        """Calibrate codebooks on these token ids (a calibration text) instead of the document."""
        sha = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
        self.options = replace(self.options, calibration=f"ids:{sha}")
        self.calibration_ids = list(ids)
        return self

    def target_share(self, total_tokens: int) -> float:
        if self.budget is None:
            return DEFAULT_SHARE
        if self.budget.fraction is not None:
            return self.budget.fraction
        return min(1.0, self.budget.tokens / max(1, total_tokens))

    def layout_for(self, total_tokens: int, layers: int, kv_heads: int, head_dim: int,
                   sub_dim: int | None = None, centroids: int | None = None) -> Layout:
        """The options as given when sub_dim is set; else planned to the budget (plan_layout). Attach passes
        the sub_dim and centroids of the memory's codebooks, so only the recent window is planned there."""
        o = self.options
        if o.sub_dim:
            if head_dim % o.sub_dim:
                raise BadInputError(f"hcattention sub_dim {o.sub_dim} does not divide head_dim {head_dim}")
            return Layout(o.sub_dim, o.centroids if centroids is None else centroids, o.recent)
        return plan_layout(self.target_share(total_tokens), total_tokens, layers, kv_heads, head_dim, o,
                           sub_dim, centroids)

    def select(self, n_prefix, n_doc, window, reserve):
        if n_prefix + n_doc + reserve > window:
            raise BadInputError(
                f"the document is {n_doc:,} tokens; with the prompt and {reserve:,} tokens kept free for the chat "
                f"that exceeds the model's {window:,}-token window (hcattention keeps original positions). Use "
                f"--method kvcompose (compact positions) or --method truncate")
        return 0, n_doc

    def encoder(self, model, total_tokens, reserve=0):
        if self.options.calibration != "document" and self.calibration_ids is None:
            raise BadInputError("hcattention calibration ids are not set; call calibrate_on(ids) before encoding")
        return HCEncoder(self, model, total_tokens)

    def memory_tokens(self, total_tokens):
        return max(1, int(total_tokens * self.target_share(total_tokens)))

    def spec_problem(self, specs, tokens, geometry):
        """k, v [L, H, T, D] (model dtype, or int8 with k_scale/v_scale [L, H, T] float32), codes [L, H, T, g]
        (uint8, int16 past 256 centroids), codebooks [L, H, g, c, D/g] float32."""
        L, H, D = geometry
        unknown = set(specs) - {"k", "v", "k_scale", "v_scale", "codes", "codebooks"}
        if unknown:
            return f"unknown tensors {sorted(unknown)}"
        for name in ("k", "v"):
            dtype, shape = specs.get(name, (None, None))
            if dtype not in (*FLOATS, "I8") or list(shape) != [L, H, tokens, D]:
                return f"tensor {name!r} is {dtype} {shape}, expected {[L, H, tokens, D]}"
            scale = specs.get(f"{name}_scale")
            if (dtype == "I8") != (scale is not None):
                return f"tensor {name!r} is {dtype} {'without' if scale is None else 'with'} {name}_scale"
            if scale is not None and (scale[0] != "F32" or list(scale[1]) != [L, H, tokens]):
                return f"tensor {name}_scale is {scale[0]} {scale[1]}, expected F32 {[L, H, tokens]}"
        if "codebooks" in specs:
            dtype, shape = specs["codebooks"]
            if dtype != "F32" or len(shape) != 5 or list(shape[:2]) != [L, H] or shape[2] * shape[4] != D \
                    or not 2 <= shape[3] <= 32768:
                return f"tensor 'codebooks' is {dtype} {shape}, expected F32 [{L}, {H}, g, centroids, {D}/g]"
        if "codes" in specs:
            dtype, shape = specs["codes"]
            if dtype not in ("U8", "I16") or len(shape) != 4 or list(shape[:3]) != [L, H, tokens]:
                return f"tensor 'codes' is {dtype} {shape}, expected U8/I16 [{L}, {H}, {tokens}, g]"
        return None

    def check_memory(self, model, manifest):
        """The per-chunk specs (Method.check_memory), then across chunks: one chunk holds the codebooks, and
        every chunk's codes have their group count and an integer type wide enough for their centroids."""
        import torch

        super().check_memory(model, manifest)
        name = manifest.get("name")
        if not manifest.get("chunks"):
            return  # blocks made in process (tests): nothing read from disk to check
        books = [r for r in manifest["chunks"] if "codebooks" in (r.get("tensors") or {})]
        if len(books) != 1:
            raise CorruptMemoryError(f"{name}: hcattention memory has codebooks in {len(books)} chunks, not 1")
        _, _, g, c, _ = books[0]["tensors"]["codebooks"][1]
        code_type = "U8" if c <= 256 else "I16"
        for r in manifest["chunks"]:
            codes = (r.get("tensors") or {}).get("codes")
            if codes is not None and (codes[0] != code_type or codes[1][3] != g):
                raise CorruptMemoryError(f"{name} chunk {r['seq']}: codes {codes[0]} {codes[1]} do not fit codebooks "
                                         f"of {g} groups × {c} centroids")
        self._centroids = c
        self._scale_max = torch.finfo(model.dtype).max / 127  # a dequantized int8 row must fit the model's dtype

    def check_block(self, record, tensors, manifest):
        """Codes index their codebooks (an index past them reads outside the device buffer), and int8 scales
        are positive and small enough that dequantized rows stay finite."""
        where = f"{manifest.get('name')} chunk {record['seq']}"
        codes = tensors.get("codes")
        if codes is not None and codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self._centroids:
                raise CorruptMemoryError(f"{where}: key codes {lo}..{hi} out of range for {self._centroids} centroids")
        for name in ("k_scale", "v_scale"):
            scale = tensors.get(name)
            if scale is not None and scale.numel():
                lo, hi = float(scale.min()), float(scale.max())
                if not 0 < lo <= hi <= self._scale_max:
                    raise CorruptMemoryError(f"{where}: {name} {lo:g}..{hi:g} out of range (0, {self._scale_max:g}]")

    def check_resources(self, manifest, device, dtype):
        """Nothing here: attach checks the device/host split itself (module-level check_resources) before
        it allocates, since only it knows which rows stay on the host."""

    def attach(self, model, manifest, blocks):
        import torch

        self.check_memory(model, manifest)
        blocks = self.checked_blocks(manifest, blocks)
        c = model.config
        L = c.num_hidden_layers
        records = manifest["chunks"]
        specs = {name: spec for r in records for name, spec in (r.get("tensors") or {}).items()}
        if "codebooks" not in specs or "v" not in specs:
            raise CorruptMemoryError(f"{manifest.get('name')}: hcattention memory without codebooks or values")
        _, _, g, centroids, _ = specs["codebooks"][1]
        N = manifest["tokens"]["count"]
        host_dtype = torch.int8 if specs["v"][0] == "I8" else model.dtype
        D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        recent = self.layout_for(N, L, c.num_key_value_heads, D, D // g, centroids).recent
        options = replace(self.options, recent=recent)
        builder = _new_builder(model, [N] * L, options, g, centroids, host_dtype)
        spans = []
        for record, t in blocks:
            if not t:
                continue
            a, b = record["start"], record["end"]
            spans.append((a, b))
            for li in range(L):
                builder.put(li, a, b, t["k"][li], t["v"][li], t["k_scale"][li] if "k_scale" in t else None,
                            t["v_scale"][li] if "v_scale" in t else None,
                            t["codes"][li] if "codes" in t else None)
            if "codebooks" in t:
                builder.set_codebooks(t["codebooks"])
            del t  # one chunk in flight
        return _finish(model, builder, options, manifest["positions"]["logical_length"], spans)


def _new_builder(model, lengths, o, g, centroids, host_dtype) -> _Builder:
    import torch

    c = model.config
    H = c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    G = c.num_attention_heads // H
    elem = torch.empty(0, dtype=host_dtype).element_size()
    row = D * elem + (4 if host_dtype == torch.int8 else 0)
    host = sum(max(0, N - min(o.sinks, N) - o.recent) for N in lengths) * H * row * (2 if o.exact_keys else 1)
    check_resources(model.device, _device_needs(lengths, H, D, G, g, centroids, o,
                                                torch.empty(0, dtype=model.dtype).element_size()), host)
    return _Builder(model, lengths, o, g, centroids, host_dtype, pin=model.device.type == "cuda")


def _finish(model, builder: _Builder, o, logical: int, spans) -> HCMemory:
    store = builder.finish(o)
    c = model.config
    L, H, D = len(store.layers), builder.H, builder.D
    dev = {"codes": 0, "codebooks": 0, "exact": 0, "outliers": 0}
    for lay in store.layers:
        for k, v in lay.device_bytes().items():
            dev[k] += v
    entries = sum(builder.lengths) * H
    exact_entries = sum(lay.res_k.shape[1] for lay in store.layers) * H
    outlier_entries = sum(0 if lay.out_idx is None else lay.out_idx.numel() for lay in store.layers)
    # device share in bf16 terms: codes and fp16 codebooks as they are, exact entries at 2 bytes per element,
    # outliers as a bf16 key and an int64 index each
    device_bf16 = dev["codes"] + dev["codebooks"] + exact_entries * D * 2 * 2 + outlier_entries * (D * 2 + 8)
    host = sum(lay.host_v.nbytes + (lay.host_k.nbytes if lay.host_k is not None else 0) for lay in store.layers)
    accounts = {"entries": entries, "full_bf16": entries * D * 2 * 2, "device": device_bf16, **dev, "host": host,
                "device_share": device_bf16 / max(1, entries * D * 4),
                "sub_dim": store.layers[0].codebooks.shape[-1], "centroids": store.layers[0].codebooks.shape[-2],
                "recent": o.recent, "outlier_entries": outlier_entries}
    use_hc_attention(model)
    cache = _hc_cache(L, H, D, model.device, model.dtype, store)
    return HCMemory(cache, logical, [0] * c.num_hidden_layers, spans, store=store, accounts=accounts)


# --- composition: other methods' memories served the HCAttention way ----------------------------------------

def _layers_of(model, manifest, blocks):
    """Per-layer (keys [H, N_l, D], values, valid [H, N_l] | None) on the CPU, logical length, chunk spans,
    for `full`/`truncate` ([L, H, T, D] chunks) and `kvcompose` (flat entries; compact layout re-rotated)."""
    import torch

    name = manifest["method"]["name"]
    c = model.config
    L = c.num_hidden_layers
    if name in ("full", "truncate"):
        ks, vs, spans, at = [], [], [], 0
        for _, t in blocks:
            if t:
                ks.append(t["k"])
                vs.append(t["v"])
                spans.append((at, at + t["k"].shape[2]))
                at += t["k"].shape[2]
        if not ks:
            raise BadInputError(f"{manifest.get('name')}: the memory holds no tokens")
        K, V = torch.cat(ks, 2), torch.cat(vs, 2)
        return [(K[i], V[i], None) for i in range(L)], manifest["positions"]["logical_length"], spans
    if name == "kvcompose":
        from ..kvcompose import _assemble, _Heads, _unpack, compact_positions

        Hkv = c.num_key_value_heads
        layers, spans, at = [_Heads(Hkv) for _ in range(L)], [], 0
        for _, t in blocks:
            if not t:
                continue
            for li, j, k, v, p in _unpack(t, L):
                layers[li].add(j, k, v, p)
            n0 = int(t["counts"][0].max())
            spans.append((at, at + n0))
            at += n0
        if not spans:
            raise BadInputError(f"{manifest.get('name')}: the memory holds no tokens")
        logical, positions = manifest["positions"]["logical_length"], None
        if manifest["positions"].get("layout") == "compact":  # the rule of KVCompose.attach
            room = int(c.max_position_embeddings) - manifest["chunking"]["reserve"]
            logical = min(max(max(h[0].shape[0] for h in lay.flat()) for lay in layers), room)
            positions = lambda m: compact_positions(m, logical, model.device)  # noqa: E731
        out = []
        with torch.inference_mode():
            for lay in layers:  # one layer at a time on the device (re-rotation), then back to the host
                k, v, mask = _assemble([lay], positions, model.model.rotary_emb, model.device, model.dtype)[0]
                out.append((k[0].cpu(), v[0].cpu(), None if mask is None else mask.cpu()))
        return out, logical, spans
    raise BadInputError(f"hcattention cannot serve a {name!r} memory (it serves full, truncate and kvcompose)")


def serve(model, manifest: dict, blocks: Iterable[tuple[dict, dict]],
          options: HCAttentionOptions = HCAttentionOptions(), budget_share: float = DEFAULT_SHARE) -> HCMemory:
    """Attach a `full`, `truncate` or `kvcompose` memory the HCAttention way: codebooks calibrated at attach
    (per layer, on calib_tokens keys spread over its first calib_span), codes, outliers and exact window on the
    device, rows in host memory."""
    import torch

    from .. import from_manifest

    served = from_manifest(manifest)  # its own read-time checks first (an unknown method is refused there)
    served.check_memory(model, manifest)
    layers, logical, spans = _layers_of(model, manifest, served.checked_blocks(manifest, blocks))
    c = model.config
    H, D = c.num_key_value_heads, layers[0][0].shape[-1]
    lengths = [k.shape[1] for k, _, _ in layers]
    tokens = sum(lengths) // len(lengths)
    if options.sub_dim:
        layout = Layout(options.sub_dim, options.centroids, options.recent)
    else:
        layout = plan_layout(budget_share, tokens, len(layers), H, D, options)
    options = replace(options, recent=layout.recent)
    d, centroids = layout.sub_dim, layout.centroids
    host_dtype = torch.int8 if options.value_bits == 8 else model.dtype
    builder = _new_builder(model, lengths, options, D // d, centroids, host_dtype)
    span, stride = calibration_stride(tokens, options)
    with torch.inference_mode():
        books = [quant.calibrate(k[:, :span:stride][:, :options.calib_tokens].to(model.device)[None],
                                 d, centroids, options.kmeans_iters, options.seed)[0]
                 for k, _, _ in layers]  # [H, g, c, d] each
        builder.set_codebooks(torch.stack(books))
        for li, (k, v, valid) in enumerate(layers):
            builder.put(li, 0, k.shape[1], k, v, valid=valid)
    return _finish(model, builder, options, logical, spans)
