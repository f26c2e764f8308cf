"""`kvcompose`: KVCompose (arXiv 2509.05165; kvpress `KVComposePress`) — attention-guided, layer-adaptive
composite-token memories, encoded chunk by chunk at bounded memory. Knows nothing of files or text.

Per chunk: prefill it over the compressed memory of the chunks before it; probe it — `repeat` (the chunk
re-read after itself, KVzip-like, kvpress's default) or `window` (its last `window` queries, SnapKV-like) —
scoring its tokens blockwise (running max/mean over probe queries, never a full attention matrix); per KV
head scores → composite tokens (rank r of layer l = every head's r-th best token) → global top-N over
(layer, rank), layer 0 never cut more than another → each head keeps its top-B_l. The global rule runs per
chunk (N = kept fraction × layers × chunk tokens): committed chunks never change; peak memory = budget +
one chunk and its probe.

Stored per chunk: "k", "v" [entries, head_dim] (layer-major, then KV head, then original order), "pos"
int64 [entries] (original position: index in the memory sequence), "counts" int32 [layers, kv_heads].
Keys are stored rotated at their original positions. Layout "original" (the memory plus the reserve fits
the window): keys used as stored, questions continue at the memory's length. Layout "compact": each
layer's entries, in original order, get consecutive positions ending just before P = min(longest layer,
window - reserve) (spread evenly over [0, P) when a layer holds more than P), keys re-rotated, questions at
P. Encoding uses the original positions while the chunk and its probe fit the window, the compact rule
(with the chunk and probe in place of the reserve) after that. Left alone, layer 0 (never cut more than
another) keeps nearly every token of a long document, several entries to a position; `layer_cap` (off: not
in kvpress, whose contexts always fit, and measured worse at 4x the window, evals/results/kvcompose-long-3)
keeps every layer within window - reserve entries instead, its unused budget going to other layers.

Layers (and unstructured heads) differ in length: encoding and attach switch the model to the registered
`combllama_ragged` attention, SDPA with a bottom-right causal mask per layer and key masks for padded
heads (batch 1; on equal-length caches it computes what SDPA does).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError, CorruptMemoryError
from .base import Encoder, KVMemory, Method, Options, kv_spec_problem, make_cache

ATTENTION = "combllama_ragged"
SCORE_ELEMENTS = 1 << 23  # attention probabilities materialised at once while scoring
DEFAULT_FRACTION = 0.25  # kept when no --budget is given
_AGGS = ("max", "mean")


# --- attention: ragged caches and blockwise probe scores ------------------------------------------------

def probe_scores(query, key, a: int, b: int, scaling: float, agg: str = "max", last: int | None = None,
                 key_mask=None):
    """Attention of probe queries to key columns [a, b), aggregated over queries, in blocks.

    query [1, heads, q, D] (the last q positions of the sequence), key [1, kv_heads, k, D], key_mask
    [kv_heads, k] bool or None; `last` scores only the last queries. Softmax runs over all k keys with a
    bottom-right causal mask, as in eager attention. Returns [heads, b - a] float32.
    """
    import torch

    H, q = query.shape[1], query.shape[2]
    G = H // key.shape[1]
    k_len = key.shape[2]
    keys = key[0].float().repeat_interleave(G, 0).transpose(1, 2)  # [H, D, k]
    allowed_keys = None if key_mask is None else key_mask.repeat_interleave(G, 0)[:, None, :]  # [H, 1, k]
    first = q - min(last, q) if last else 0
    step = max(1, SCORE_ELEMENTS // (H * k_len))
    out = torch.full((H, b - a), -torch.inf if agg == "max" else 0.0, device=query.device)
    for s in range(first, q, step):
        e = min(q, s + step)
        logits = query[0, :, s:e].float() @ keys * scaling  # [H, blk, k]
        qi = torch.arange(s, e, device=query.device)[:, None]
        allowed = torch.arange(k_len, device=query.device)[None] <= (k_len - q) + qi  # [blk, k]
        allowed = allowed[None] if allowed_keys is None else allowed[None] & allowed_keys
        probs = logits.masked_fill_(~allowed, -torch.inf).softmax(-1)[:, :, a:b]  # [H, blk, n]
        out = torch.maximum(out, probs.amax(1)) if agg == "max" else out + probs.sum(1)
    return out if agg == "max" else out / (q - first)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     kvcompose_scorer=None, combllama_key_masks=None, **kwargs):
    """transformers attention function (query [B, H, q, D], key/value [B, H_kv, k, D]) for caches whose
    layers differ in length: the mask is built from this layer's own shapes, bottom-right aligned."""
    import torch
    import torch.nn.functional as F

    q, k = query.shape[2], key.shape[2]
    key_mask = None
    if combllama_key_masks is not None and combllama_key_masks[module.layer_idx] is not None:
        m = combllama_key_masks[module.layer_idx]  # [H_kv, memory]
        key_mask = torch.cat([m, m.new_ones(m.shape[0], k - m.shape[1])], 1)  # [H_kv, k]
    if kvcompose_scorer is not None:
        kvcompose_scorer(module.layer_idx, query, key, scaling, key_mask)
    G = query.shape[1] // key.shape[1]
    causal = False
    if attention_mask is not None and attention_mask.shape[-1] == k and key_mask is None:
        mask = attention_mask
    elif key_mask is None and q == k:
        mask, causal = None, q > 1
    elif key_mask is None and q == 1:
        mask = None
    elif key_mask is None and query.is_cuda:  # flash/efficient kernels take a bottom-right causal bias (no GQA)
        from torch.nn.attention.bias import causal_lower_right

        mask, key, value, G = causal_lower_right(q, k), key.repeat_interleave(G, 1), value.repeat_interleave(G, 1), 1
    else:
        if key_mask is not None and query.shape[0] != 1:  # the key masks belong to one attached memory
            raise NotImplementedError("ragged KV caches with key masks support batch size 1 only")
        qi = torch.arange(q, device=query.device)[:, None]
        mask = (torch.arange(k, device=query.device)[None] <= (k - q) + qi)[None, None]  # [1, 1, q, k]
        if key_mask is not None:
            mask = mask & key_mask.repeat_interleave(G, 0)[None, :, None, :]  # [1, H, q, k]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=G > 1)
    return out.transpose(1, 2).contiguous(), None


def use_ragged_attention(model) -> None:
    """Register `combllama_ragged` (idempotent) and make `model` use it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, ragged_attention)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


# --- positions -------------------------------------------------------------------------------------------

def compact_positions(m: int, end: int, device=None):
    """Positions of m entries (in original order) ending just before `end`; spread over [0, end) if m > end."""
    import torch

    if m <= end:
        return torch.arange(end - m, end, device=device)
    return torch.arange(m, device=device) * end // m


def rerotate(keys, delta, rotary):
    """RoPE keys [..., n, D] rotated at p → rotated at p + delta (delta [n] int, or an int)."""
    import torch

    if isinstance(delta, int):
        delta = torch.full((keys.shape[-2],), delta, device=keys.device)
    if not bool(torch.any(delta != 0)):
        return keys
    probe = torch.empty(0, dtype=torch.float32, device=keys.device)
    cos, sin = rotary(probe, delta.to(keys.device).reshape(1, -1))  # [1, n, D], times attention_scaling
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    cos, sin = cos[0] / scale, sin[0] / scale
    x = keys.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(keys.dtype)


# --- selection: kvpress's KVCompose steps on one chunk's scores --------------------------------------------

def select_tokens(scores, keep: float, opts, v_norms=None, cap: int | None = None):
    """Kept token indices for scores [layers, kv_heads, n] (float32, per KV head): returns (counts
    [layers, kv_heads] int64, kept[l][j] ascending LongTensor). `keep` = fraction kept (1 - kvpress ratio);
    `cap`: most tokens one layer (unstructured: one head) may keep, the budget it cannot take going to the
    next-best composite tokens of other layers (None: kvpress's rule, no cap)."""
    import torch

    L, Hkv, n = scores.shape
    S = scores.clone()
    if opts.add_v_norm and v_norms is not None:
        S = S * v_norms
    if opts.add_mean_across_heads:
        S = S + S.mean(dim=1, keepdim=True)
    ranked = S.sort(dim=-1, descending=True).values  # [L, Hkv, n]: Ŝ_{l,j}(r)
    lb = opts.keep_token_lower_bound
    ratio = 1 - keep
    if opts.structured:
        C = ranked.mean(dim=1) if opts.agg_head == "mean" else ranked.amax(dim=1)  # [L, n]: composite tokens
        C[..., :lb] += 1e9
        C[0] = C.max(dim=0).values  # layer 0 is never cut more than another layer
        if cap is not None:
            C[:, max(1, cap):] = -torch.inf
        n_kept = max(1, min(int(C.numel() * (1 - ratio)), int(torch.isfinite(C).sum())))
        layer = C.reshape(-1).topk(n_kept).indices // n
        top = n if cap is None else max(1, min(cap, n))
        counts = torch.bincount(layer, minlength=L).clamp(min=min(max(1, lb), top), max=top)[:, None].expand(L, Hkv)
    else:
        per_head = ranked.clone()
        per_head[..., :lb] += 1e9
        if cap is not None:
            per_head[..., max(1, cap):] = -torch.inf
        n_kept = max(1, min(int(per_head.numel() * (1 - ratio)), int(torch.isfinite(per_head).sum())))
        slot = per_head.reshape(-1).topk(n_kept).indices // n
        counts = torch.bincount(slot, minlength=L * Hkv).reshape(L, Hkv)
    order = torch.argsort(S, dim=-1, descending=True)
    kept = [[order[l, j, :int(counts[l, j])].sort().values for j in range(Hkv)] for l in range(L)]
    return counts.contiguous(), kept


# --- the method --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVComposeOptions(Options):
    """kvpress KVComposePress defaults; `probe`/`window` choose what scores the tokens."""

    structured: bool = True  # uniform layout across heads; False: every head keeps its own count
    agg_task: str = "max"  # over probe queries
    agg_group: str = "mean"  # over the query heads of one KV head
    agg_head: str = "mean"  # over KV heads, forming composite tokens
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    keep_recent: int = 0  # the memory's last tokens kept whole in every head, inside the budget (not in kvpress)
    layer_cap: bool = False  # past the window, no layer keeps more entries than it has positions (not in kvpress)
    probe: str = "repeat"  # repeat: the chunk re-read (KVzip-like) | window: its last `window` queries
    window: int = 64

    def __post_init__(self) -> None:
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in _AGGS:
                raise BadInputError(f"kvcompose {name} must be one of {', '.join(_AGGS)}, not {getattr(self, name)!r}")
        if self.probe not in ("repeat", "window"):
            raise BadInputError(f"kvcompose probe must be 'repeat' or 'window', not {self.probe!r}")
        for name in ("keep_token_lower_bound", "keep_recent", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name[0] == "k" else 1):
                raise BadInputError(f"kvcompose {name} must be a non-negative integer (window ≥ 1)")
        for name in ("structured", "add_v_norm", "add_mean_across_heads", "layer_cap"):
            if not isinstance(getattr(self, name), bool):
                raise BadInputError(f"kvcompose {name} must be true or false")


class _Scorer:
    """Model kwarg: per-layer probe scores of the chunk's columns [a_l, a_l + n) of each layer's keys."""

    def __init__(self, starts: list[int], n: int, agg: str, last: int | None):
        self.starts, self.n, self.agg, self.last, self.scores = starts, n, agg, last, {}

    def __call__(self, layer, query, key, scaling, key_mask):
        a, b = self.starts[layer], self.starts[layer] + self.n
        self.scores[layer] = probe_scores(query, key, a, b, scaling, self.agg, self.last, key_mask)


class _Heads:
    """Entries of one layer, per KV head: keys rotated at original positions, values, original positions."""

    def __init__(self, n_heads: int):
        self.runs: list[list] = [[] for _ in range(n_heads)]  # per head: [(k [m, D], v [m, D], pos [m]), ...]
        self._flat: list | None = None  # cache of flat()

    def add(self, j: int, k, v, pos) -> None:
        self.runs[j].append((k, v, pos))
        self._flat = None

    def flat(self) -> list:  # per head (k [m, D], v [m, D], pos [m]), concatenated once per change
        import torch

        if self._flat is None:
            self._flat = [tuple(torch.cat(x) for x in zip(*runs)) for runs in self.runs]
            self.runs = [[f] for f in self._flat]  # one copy of the memory, not two
        return self._flat


def _assemble(layers: list[_Heads], positions, rotary, device, dtype):
    """Per-layer (K [1, H, M, D], V, key_mask [H, M] | None) with keys re-rotated to `positions(m)` (None:
    original). Heads shorter than the layer's longest are padded and masked."""
    import torch

    out = []
    for lay in layers:
        heads = lay.flat()
        M = max(h[0].shape[0] for h in heads)
        ks, vs, masks = [], [], []
        for k, v, p in heads:
            k, v = k.to(device, dtype), v.to(device, dtype)
            if positions is not None:
                k = rerotate(k, positions(k.shape[0]).to(device) - p.to(device), rotary)
            pad = M - k.shape[0]
            ks.append(torch.cat([k, k.new_zeros(pad, k.shape[1])]))
            vs.append(torch.cat([v, v.new_zeros(pad, v.shape[1])]))
            masks.append(torch.arange(M, device=device) < k.shape[0])
        mask = torch.stack(masks)
        out.append((torch.stack(ks)[None], torch.stack(vs)[None], None if bool(mask.all()) else mask))
    return out


def _unpack(tensors: dict, n_layers: int):
    """Split one chunk's flat tensors into (layer, head, k, v, pos) runs."""
    counts = tensors["counts"].tolist()
    if len(counts) != n_layers:
        raise BadInputError(f"kvcompose chunk has {len(counts)} layers, the model {n_layers}")
    i = 0
    for l, row in enumerate(counts):
        for j, c in enumerate(row):
            yield l, j, tensors["k"][i:i + c], tensors["v"][i:i + c], tensors["pos"][i:i + c]
            i += c


class KVComposeEncoder(Encoder):
    def __init__(self, method: "KVCompose", model, total_tokens: int, reserve: int = 0):
        self.method, self.model, self.opts = method, model, method.options
        # The last `keep_recent` tokens are kept whole; the rest of the budget goes to the scored tokens.
        self.recent_from = max(0, total_tokens - self.opts.keep_recent)
        keep = method.keep_fraction(total_tokens)
        self.keep = min(1.0, max(0.0, keep * total_tokens - self.opts.keep_recent) / max(1, self.recent_from)) \
            if self.opts.keep_recent else keep
        c = model.config
        self.n_layers, self.n_kv, self.window = c.num_hidden_layers, c.num_key_value_heads, c.max_position_embeddings
        self.layers = [_Heads(self.n_kv) for _ in range(self.n_layers)]
        # layer_cap: attach lays a compact memory out in window - reserve positions per layer. One rate over
        # the scored tokens keeps every layer's floors within that room: never two entries on one position.
        room = self.window - reserve
        self.cap_rate = None if not self.opts.layer_cap or total_tokens <= room else \
            max(0, room - self.opts.keep_recent) / max(1, self.recent_from)

    def restore(self, chunk, tensors):
        dev = self.model.device
        for l, j, k, v, p in _unpack(tensors, self.n_layers):
            self.layers[l].add(j, k.to(dev, self.model.dtype), v.to(dev, self.model.dtype), p.to(dev))

    def encode(self, chunk):
        import torch

        model, opts = self.model, self.opts
        dev, dt = model.device, model.dtype
        ids = torch.tensor([chunk.ids], device=dev)
        n = len(chunk.ids)
        probe_n = n if opts.probe == "repeat" else 0
        if n + probe_n >= self.window:
            raise BadInputError(f"kvcompose: a {n}-token chunk and its probe do not fit the {self.window}-token "
                                f"window; use a smaller --chunk-tokens")
        rotary = model.model.rotary_emb
        if chunk.end + probe_n <= self.window:  # original positions
            base, positions = chunk.start, None
        else:
            longest = max(max(x[0].shape[0] for x in lay.flat()) for lay in self.layers)
            base = min(longest, self.window - n - probe_n)
            positions = lambda m: compact_positions(m, base, dev)  # noqa: E731
        kv = _assemble(self.layers, positions, rotary, dev, dt) if self.layers[0].runs[0] else []
        starts = [x[0].shape[2] for x in kv] or [0] * self.n_layers
        masks = [x[2] for x in kv] if any(x[2] is not None for x in kv) else None
        cache, kv = make_cache([(k, v) for k, v, _ in kv]), None  # no extra reference once update() cats
        scorer = _Scorer(starts, n, opts.agg_task, opts.window if opts.probe == "window" else None)
        pos = torch.arange(base, base + n, device=dev)[None]
        use_ragged_attention(model)
        with torch.inference_mode():
            extra = {"combllama_key_masks": masks} if masks else {}
            first = {"kvcompose_scorer": scorer} if opts.probe == "window" else {}
            model.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True, **extra, **first)
            if opts.probe == "repeat":  # the chunk re-read after itself; only its attention is recorded
                model.model(input_ids=ids, past_key_values=cache, position_ids=pos + n, use_cache=True,
                            kvcompose_scorer=scorer, **extra)
            per_q = torch.stack([scorer.scores[l] for l in range(self.n_layers)])  # [L, H, n]
            per_q = per_q.reshape(self.n_layers, self.n_kv, -1, n)  # [L, Hkv, G, n]
            scores = per_q.mean(2) if opts.agg_group == "mean" else per_q.amax(2)  # [L, Hkv, n]
            ks = torch.stack([cache.layers[l].keys[0, :, starts[l]:starts[l] + n] for l in range(self.n_layers)])
            vs = torch.stack([cache.layers[l].values[0, :, starts[l]:starts[l] + n] for l in range(self.n_layers)])
            del cache  # [L, Hkv, n, D] chunk keys/values survive; memory and probe are dropped
            v_norms = vs.float().norm(dim=-1) if opts.add_v_norm else None
            scored = min(n, max(0, self.recent_from - chunk.start))  # the chunk's tokens before the recent tail
            cap = None if self.cap_rate is None else int(scored * self.cap_rate)
            counts, kept = select_tokens(scores[..., :scored], self.keep, opts,
                                         None if v_norms is None else v_norms[..., :scored], cap) if scored else (0, None)
            tail = torch.arange(scored, n, device=dev)  # kept whole (keep_recent)
            kept = [[tail if kept is None else torch.cat([kept[l][j], tail]) for j in range(self.n_kv)]
                    for l in range(self.n_layers)]
            counts = counts + (n - scored) + torch.zeros(self.n_layers, self.n_kv, dtype=torch.long, device=dev)
            ks = rerotate(ks, chunk.start - base, rotary)  # to original positions
        out: list[tuple] = []  # the memory stays on the device; the chunk's share goes to disk
        for l in range(self.n_layers):
            for j in range(self.n_kv):
                idx = kept[l][j]
                out.append((ks[l, j, idx], vs[l, j, idx], idx + chunk.start))
                self.layers[l].add(j, *out[-1])
        k, v, p = (torch.cat(x).cpu() for x in zip(*out))
        return {"k": k, "v": v, "pos": p.to(torch.int64), "counts": counts.to(torch.int32).cpu()}


class KVCompose(Method):
    name = "kvcompose"
    summary = "KVCompose: attention-scored composite tokens, layer-adaptive budget (--budget, default 0.25)"
    Options = KVComposeOptions

    def keep_fraction(self, total_tokens: int) -> float:
        b = self.budget
        return DEFAULT_FRACTION if b is None else b.fraction if b.fraction is not None else \
            min(1.0, b.tokens / max(1, total_tokens))

    def select(self, n_prefix, n_doc, window, reserve):
        if n_prefix + reserve >= window:
            raise BadInputError(f"the model's {window}-token window leaves no room for the memory")
        return 0, n_doc

    def layout(self, total_tokens: int, window: int, reserve: int) -> str:
        return "original" if total_tokens + reserve <= window else "compact"

    def encoder(self, model, total_tokens, reserve=0):
        return KVComposeEncoder(self, model, total_tokens, reserve)

    def memory_tokens(self, total_tokens):
        return max(1, int(total_tokens * self.keep_fraction(total_tokens)))

    def attach(self, model, manifest, blocks):
        import torch

        self.check_memory(model, manifest)
        blocks = self.checked_blocks(manifest, blocks)
        c = model.config
        L, Hkv = c.num_hidden_layers, c.num_key_value_heads
        layers, spans, at = [_Heads(Hkv) for _ in range(L)], [], 0
        for _, tensors in blocks:
            if not tensors:
                continue
            for l, j, k, v, p in _unpack(tensors, L):
                layers[l].add(j, k, v, p)
            spans.append((at, (at := at + int(tensors["counts"][0].max()))))  # layer 0's physical span
        if not spans:
            raise BadInputError(f"{manifest.get('name')}: the memory holds no tokens")
        logical = manifest["positions"]["logical_length"]
        positions = None
        if manifest["positions"].get("layout") == "compact":
            room = int(c.max_position_embeddings) - manifest["chunking"]["reserve"]
            logical = min(max(max(h[0].shape[0] for h in lay.flat()) for lay in layers), room)
            positions = lambda m: compact_positions(m, logical, model.device)  # noqa: E731
        with torch.inference_mode():
            kv = _assemble(layers, positions, model.model.rotary_emb, model.device, model.dtype)
        cache = make_cache([(k, v) for k, v, _ in kv])
        masks = [m for _, _, m in kv]
        if any(m is not None for m in masks):
            cache.attention_kwargs = {"combllama_key_masks": masks}  # read by base.prefill
        use_ragged_attention(model)
        return KVMemory(cache, logical, [k.shape[2] for k, _, _ in kv], spans)

    # -- read-time checks (Method.check_memory / check_block) --
    def spec_problem(self, specs, tokens, geometry):
        """k, v [entries, head_dim], pos int64 [entries], counts int32 [layers, kv_heads]; at most every
        token of the chunk in every head."""
        L, H, D = geometry
        if set(specs) != {"k", "v", "pos", "counts"}:
            return f"tensors {sorted(specs)}, expected ['counts', 'k', 'pos', 'v']"
        e = specs["k"][1][0] if len(specs["k"][1]) == 2 else -1
        if not 0 <= e <= L * H * tokens:
            return f"tensor 'k' has shape {specs['k'][1]}, expected [entries ≤ {L * H * tokens}, {D}]"
        return (kv_spec_problem({"k": specs["k"], "v": specs["v"]}, {"k": [e, D], "v": [e, D]})
                or kv_spec_problem({"pos": specs["pos"]}, {"pos": [e]}, ("I64",))
                or kv_spec_problem({"counts": specs["counts"]}, {"counts": [L, H]}, ("I32",)))

    def check_block(self, record, tensors, manifest):
        """counts are per-head run lengths that add up to the entries (else runs would be cut from the wrong
        rows), and each run's positions rise inside the chunk's token span (they place re-rotated keys)."""
        import torch

        where = f"{manifest.get('name')} chunk {record['seq']}"
        counts, pos = tensors["counts"].long(), tensors["pos"]
        n = record["end"] - record["start"]
        if int(counts.min()) < 0 or int(counts.max()) > n or int(counts.sum()) != pos.shape[0]:
            raise CorruptMemoryError(f"{where}: kvcompose counts ({int(counts.min())}..{int(counts.max())}, sum "
                                     f"{int(counts.sum())}) do not split {pos.shape[0]} entries of a {n}-token chunk")
        if pos.numel() and (int(pos.min()) < record["start"] or int(pos.max()) >= record["end"]):
            raise CorruptMemoryError(f"{where}: kvcompose positions {int(pos.min())}..{int(pos.max())} lie outside "
                                     f"the chunk's tokens {record['start']}..{record['end'] - 1}")
        rises = pos[1:] > pos[:-1]
        starts = torch.cumsum(counts.reshape(-1), 0)[:-1]  # a new run may start lower
        rises[starts[(starts > 0) & (starts < pos.shape[0])] - 1] = True
        if not bool(rises.all()):
            raise CorruptMemoryError(f"{where}: kvcompose positions are not increasing within a head")
