"""`combllama`: a chunk encoder turns each chunk of the document into key/value states for cross-attention
blocks placed before every 4th layer of the frozen base model (COMB, arXiv 2602.01519; mission.md §3).

encode: the prompt prefix (chat template + system text) is prefilled through the base model as an ordinary
KV cache; so is the document's recent tail (its last `recent` tokens, at the positions after the prefix; the
base model reads them alone, as `truncate` would keep them); every other document token goes through the
encoder, chunk by chunk, independent of the other chunks, with a chunk-index embedding. The adapter's config
says which encoder (modules.py): "base", the frozen model's own K/V of the chunk at each cross layer (the
shipped SmolLM2 adapter), or "stack", bidirectional copies of the cross layers on the embeddings (older
adapters, upstream checkpoints). With a --budget below 1 (0.25 when none is given) each cross layer keeps
fewer tokens: KVCompose's composite-token selection (kvcompose.select_tokens) over scores from a probe in which
the base model re-reads the chunk through its cross blocks (the KVzip-like "repeat" probe, on cross instead of
self attention).

Stored per chunk: "k.i", "v.i" [kv_heads, tokens_i, head_dim] for cross layer i (keys after k_norm; "base":
rotated), the adapter's sha256 "adapter" uint8 [32], on the chunk where the prefix ends "pk", "pv" [layers,
kv_heads, prefix, head_dim], and on every chunk holding tail tokens "rk", "rv" [layers, kv_heads, its tail tokens,
head_dim]. attach: a KV cache of the prefix and the tail (positions continue after it: the rest of the document
takes no positions) carrying the cross memory as the forward keyword the decoder hooks read.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import BadInputError, CorruptMemoryError, IncompatibleMemoryError
from ..base import FLOATS, Budget, Encoder, KVMemory, Method, Options, layer_kv, make_cache, prefill

ADAPTERS = Path(__file__).resolve().parent / "adapters"  # shipped adapters, matched by base model
_AGGS = ("max", "mean")
DEFAULT_FRACTION = 0.25  # of the cross memory kept when no --budget is given (1: unpruned)
_CACHED = ("pk", "pv", "rk", "rv")  # tensors of the ordinary KV cache: the prompt prefix and the recent tail
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model → {spec: (adapter, digest)}


@dataclass(frozen=True)
class CombLlamaOptions(Options):
    """`adapter`: "auto" (the shipped adapter trained for this model, else the untrained initialisation),
    "init" (untrained: zero gates, the model ignores the memory), a path to an adapter .safetensors file,
    or a directory holding an upstream CombLlama checkpoint. `chunk_order` False gives every chunk index 0
    (a control for the order signal). `probe_agg` aggregates probe scores over queries when pruning. `recent`:
    the document's last tokens kept as an ordinary KV cache after the prompt prefix instead of cross memory (the
    text a continuation or a question reads first; --budget does not prune them)."""

    adapter: str = "auto"
    chunk_order: bool = True
    probe_agg: str = "max"
    recent: int = 512  # the shipped adapter was trained with tails of 0-512 tokens

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, str) or not self.adapter:
            raise BadInputError("combllama adapter must be 'auto', 'init' or a path")
        if not isinstance(self.chunk_order, bool):
            raise BadInputError("combllama chunk_order must be true or false")
        if self.probe_agg not in _AGGS:
            raise BadInputError(f"combllama probe_agg must be one of {', '.join(_AGGS)}, not {self.probe_agg!r}")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise BadInputError(f"combllama recent must be a token count >= 0, not {self.recent!r}")


def shipped_adapters() -> list[Path]:
    return sorted(ADAPTERS.glob("*.safetensors")) if ADAPTERS.is_dir() else []


def shipped_for(fingerprint: str) -> Path | None:
    """The shipped adapter whose base model has this core.model fingerprint (None: none ships)."""
    from .weights import read_header

    for path in shipped_adapters():
        try:
            if read_header(path)["base_fingerprint"] == fingerprint:
                return path
        except BadInputError:
            continue
    return None


def resolve_adapter(model, spec: str):
    """(adapter, 32-byte digest) for `model` and an `adapter` option value; built once per model."""
    from .modules import CombAdapter, CombConfig
    from .weights import file_digest, load_adapter, read_header, weights_fingerprint

    per_model = _cache.setdefault(model, {})
    if spec in per_model:
        return per_model[spec]
    path = None
    if spec == "auto":
        wfp = weights_fingerprint(model)
        path = next((p for p in shipped_adapters() if _header_weights(p, read_header) == wfp), None)
    elif spec != "init":
        path = Path(spec).expanduser()
        if not path.exists():
            raise BadInputError(f"combllama adapter {spec!r}: no such file or directory")
    if path is None:
        config = CombConfig.for_model(model.config)
        adapter = CombAdapter.from_base(model, config).eval().requires_grad_(False)
        digest = hashlib.sha256(b"combllama-init:" + config.to_json().encode()).digest()
    elif path.is_dir():
        from .upstream import load_upstream, upstream_digest

        adapter, digest = load_upstream(path, model), upstream_digest(path)
    else:
        adapter, digest = load_adapter(path, model), file_digest(path)
    per_model[spec] = (adapter, digest)
    return adapter, digest


def _header_weights(path, read_header) -> str | None:
    try:
        return read_header(path)["base_weights"]
    except BadInputError:
        return None


@dataclass
class CombMemory(KVMemory):
    """The KV cache of the prefix and the recent tail (`logical_length - prefix` tokens, at the positions after
    the prefix) plus the cross memory it carries (`cache.attention_kwargs`)."""

    cross: object = None  # modules.CrossInput | None (a memory without document tokens)
    prefix: int = 0  # prompt prefix tokens at the start of the cache
    rotary: object = None  # the model's rotary embedding (concat re-rotates the tails)

    def pre_layer(self):
        if self.cross is None or self.cross.masks:
            return None
        for slot in range(len(self.cross.keys)):  # the null slot appended now, not inside a captured step
            self.cross.layer(slot)
        return self.cross.pre_layer

    def kv_entries(self) -> int:
        prefix = sum(int(lay.keys.shape[1] * lay.keys.shape[2]) for lay in self.cache.layers if lay.keys is not None)
        return prefix + (self.cross.entries() if self.cross is not None else 0)

    @classmethod
    def concat(cls, memories: list["CombMemory"]) -> "CombMemory":
        """One memory reading the cross memories of all `memories` (in order) side by side, after the prompt
        prefix cache of the first (every memory starts with the same framing) and the recent tails of all, in
        order. Cross memory has no positions; each tail is re-rotated to follow the tails before it, and the
        window holds the prefix once. The parts stay unchanged."""
        import torch

        from ..kvcompose import rerotate
        from .modules import KWARG, CrossInput

        first = memories[0]
        L = len(first.cache.layers)
        kv = [layer_kv(first.cache, i) for i in range(L)]
        parts = [[(k[:, :, :n], v[:, :, :n])] for (k, v), n in zip(kv, first.lengths)]  # the same tensors
        shift = first.logical_length - first.prefix
        for m in memories[1:]:
            tail = m.logical_length - m.prefix
            if not tail:
                continue
            for i in range(L):
                k, v = layer_kv(m.cache, i)
                k, v = k[:, :, m.prefix:m.prefix + tail], v[:, :, m.prefix:m.prefix + tail]
                parts[i].append((rerotate(k, shift, m.rotary), v))
            shift += tail
        cache = make_cache([(torch.cat([k for k, _ in p], 2), torch.cat([v for _, v in p], 2)) if len(p) > 1
                            else p[0] for p in parts])
        crosses = [m.cross for m in memories if m.cross is not None]
        cross = None
        if crosses:
            adapter = crosses[0].adapter
            if any(c.adapter is not adapter or c.masks for c in crosses):
                raise IncompatibleMemoryError("these memories were encoded with different CombLlama adapters "
                                              "and cannot be read together")
            X = len(crosses[0].keys)
            cross = CrossInput(adapter, [torch.cat([c.keys[i] for c in crosses], 2) for i in range(X)],
                               [torch.cat([c.values[i] for c in crosses], 2) for i in range(X)])
            cache.attention_kwargs = {KWARG: cross}
        n = first.prefix + shift
        return cls(cache, n, [n] * L, [], cross, first.prefix, first.rotary)


def probe_scores(adapter, model, ids, keys, values, agg: str):
    """Scores [X, H, n] of a chunk's memory tokens: the base model re-reads the chunk's ids [n] through its
    cross blocks (reading that chunk's memory keys/values [1, Hkv, n, D] per layer); each cross layer's
    attention probabilities are aggregated over the n queries (max or mean)."""
    import torch

    from .modules import KWARG, CrossInput

    scores = {}
    D = keys[0].shape[-1]

    def record(slot, q, k, mask):  # q [1, H, n, D], k [1, Hkv, n, D]
        G = q.shape[1] // k.shape[1]
        logits = q[0].float() @ k[0].float().repeat_interleave(G, 0).transpose(1, 2) / D ** 0.5  # [H, n, n]
        p = logits.softmax(-1)
        scores[slot] = p.amax(1) if agg == "max" else p.mean(1)

    x = torch.tensor([ids], device=model.device)
    pos = torch.arange(len(ids), device=model.device)[None]
    model.model(input_ids=x, position_ids=pos, use_cache=False,
                **{KWARG: CrossInput(adapter, keys, values, scorer=record)})
    return torch.stack([scores[i] for i in range(len(keys))])


class CombEncoder(Encoder):
    """Chunks in order → their tensors. Holds the prompt prefix's ids and, while the recent tail is being
    written, the KV cache of the prefix and the tail so far (rebuilt from the committed chunks on resume)."""

    def __init__(self, method: "CombLlama", model, total_tokens: int):
        if method.n_prefix is None:
            raise BadInputError("combllama: select() must run before encoding (core.encode.plan_memory does it)")
        from .modules import install_hooks

        self.method, self.model, self.n_prefix = method, model, method.n_prefix
        self.adapter, self.digest = resolve_adapter(model, method.options.adapter)
        self.keep = method.keep_fraction(total_tokens)
        self.total = total_tokens
        self.tail_start = total_tokens - method.recent_tokens(total_tokens - self.n_prefix)  # ids index
        self.prefix_ids: list[int] = []
        self.kv: list[tuple] = []  # per layer (K, V) [1, Hkv, prefix + tail so far, D]: the cache the tail extends
        install_hooks(model)

    def _prefix_part(self, chunk) -> int:
        """How many of the chunk's tokens belong to the prompt prefix."""
        return max(0, min(chunk.end, self.n_prefix) - chunk.start)

    def _tail_part(self, chunk) -> int:
        """How many of the chunk's last tokens belong to the recent tail."""
        return max(0, chunk.end - max(chunk.start, self.tail_start, self.n_prefix))

    def _extend(self, pairs) -> None:
        """Append (K, V) [Hkv, n, D] per layer to the cache the tail is prefilled on."""
        import torch

        model = self.model
        pairs = [(k[None].to(model.device, model.dtype), v[None].to(model.device, model.dtype)) for k, v in pairs]
        self.kv = [(torch.cat([a, k], 2), torch.cat([b, v], 2)) for (a, b), (k, v) in zip(self.kv, pairs)] \
            if self.kv else pairs

    def restore(self, chunk, tensors):
        self.prefix_ids += list(chunk.ids[:self._prefix_part(chunk)])
        if self.tail_start < self.total:
            for kk, vk in (("pk", "pv"), ("rk", "rv")):
                if kk in tensors:
                    self._extend(list(zip(tensors[kk], tensors[vk])))

    def encode(self, chunk):
        import torch

        model, dev, dt = self.model, self.model.device, self.model.dtype
        p, r = self._prefix_part(chunk), self._tail_part(chunk)
        self.prefix_ids += list(chunk.ids[:p])
        out = {"adapter": torch.frombuffer(bytearray(self.digest), dtype=torch.uint8).clone()}
        n = model.config.num_hidden_layers
        with torch.inference_mode():
            if p and chunk.start + p == self.n_prefix:  # the prefix is complete: its KV cache
                cache = make_cache([])
                prefill(model, self.prefix_ids, cache, 0, 0)
                out["pk"] = torch.stack([layer_kv(cache, i)[0][0] for i in range(n)]).cpu()  # [L, Hkv, P, D]
                out["pv"] = torch.stack([layer_kv(cache, i)[1][0] for i in range(n)]).cpu()
                if self.tail_start < self.total:
                    self.kv = [layer_kv(cache, i) for i in range(n)]
            doc = list(chunk.ids[p:len(chunk.ids) - r])
            if doc:
                ids = torch.tensor(doc, device=dev)
                cu = torch.tensor([0, len(doc)], dtype=torch.int32, device=dev)
                index = torch.full_like(ids, chunk.seq) if self.method.options.chunk_order else None
                after = torch.tensor([self.tail_start - chunk.end + r], device=dev)  # memory tokens after this chunk
                kv = self.adapter.encode(model, ids, cu, index, after)  # X × (K, V) [n, Hkv, D]
                ks = [k.transpose(0, 1).to(dt) for k, _ in kv]  # [Hkv, n, D]
                vs = [v.transpose(0, 1).to(dt) for _, v in kv]
                if self.keep < 1:
                    ks, vs = self._prune(doc, ks, vs)
                for i, (k, v) in enumerate(zip(ks, vs)):
                    out[f"k.{i}"], out[f"v.{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
            if r:  # the base model alone reads the tail after the prefix, as `truncate` keeps it
                m = self.kv[0][0].shape[2]
                cache = make_cache(self.kv)
                prefill(model, list(chunk.ids[len(chunk.ids) - r:]), cache, m, m)
                self.kv = [layer_kv(cache, i) for i in range(n)]
                out["rk"] = torch.stack([k[0, :, m:] for k, _ in self.kv]).cpu()  # [L, Hkv, r, D]
                out["rv"] = torch.stack([v[0, :, m:] for _, v in self.kv]).cpu()
        return out

    def _prune(self, doc, ks, vs):
        """Keep `keep` of the chunk's memory entries, allocated across cross layers by KVCompose."""
        import torch

        from ..kvcompose import KVComposeOptions, select_tokens

        scores = probe_scores(self.adapter, self.model, doc, [k[None] for k in ks], [v[None] for v in vs],
                              self.method.options.probe_agg)  # [X, H, n]
        X, H, n = scores.shape
        Hkv = ks[0].shape[0]
        scores = scores.reshape(X, Hkv, H // Hkv, n).mean(2)  # per KV head, as kvpress's agg_group="mean"
        _, kept = select_tokens(scores, self.keep, KVComposeOptions())
        pk = [torch.stack([ks[l][j, kept[l][j]] for j in range(Hkv)]) for l in range(X)]
        pv = [torch.stack([vs[l][j, kept[l][j]] for j in range(Hkv)]) for l in range(X)]
        return pk, pv


class CombLlama(Method):
    name = "combllama"
    positionless = True  # past the prefix and the recent tail the document takes no positions; folded turns none
    prunes = True
    summary = ("CombLlama: chunk encoder + gated cross-attention (a trained adapter per model); the document's last "
               "512 tokens stay an ordinary KV cache; --budget prunes the cross memory with KVCompose, default 0.25")
    Options = CombLlamaOptions

    def __init__(self, options=None, budget=None):
        super().__init__(options, budget)
        self.n_prefix: int | None = None

    def keep_fraction(self, total_tokens: int) -> float:
        if self.budget is None:
            return DEFAULT_FRACTION
        if self.budget.fraction is not None:
            return self.budget.fraction
        return min(1.0, self.budget.tokens / max(1, total_tokens))

    def folding(self):
        # Folded turns exist to free the window: none of them stays as a positioned tail. Unpruned unless a budget
        # says otherwise: the history's own compaction prunes them when they outgrow its byte budget.
        if not self.options.recent and self.budget is not None:
            return self
        return type(self)(replace(self.options, recent=0), self.budget or Budget(fraction=1.0))

    def recent_tokens(self, n_doc: int) -> int:
        """Document tokens kept as the recent tail (an ordinary KV cache after the prompt prefix)."""
        return min(self.options.recent, n_doc)

    def select(self, n_prefix, n_doc, window, reserve):
        if n_prefix + self.recent_tokens(n_doc) + reserve >= window:
            tail = f" after the {self.options.recent}-token recent tail" if self.options.recent else ""
            raise BadInputError(f"the model's {window}-token window leaves no room for the conversation{tail}")
        self.n_prefix = n_prefix  # the encoder keeps these tokens as an ordinary KV cache
        return 0, n_doc

    def encoder(self, model, total_tokens, reserve=0):
        return CombEncoder(self, model, total_tokens)

    def memory_tokens(self, total_tokens):
        # Per decoder layer: the recent tail, then the kept tokens times the adapter's cross layers per decoder layer.
        tail = self.recent_tokens(total_tokens)
        return tail + max(1, int((total_tokens - tail) * self.keep_fraction(total_tokens) * self.cross_share()))

    def cross_share(self) -> float:
        """Cross layers per decoder layer of the adapter this method reads, for estimates made before a model
        is loaded: for "auto" the largest among the shipped adapters; 1/4 (every 4th layer) when unknown."""
        from .weights import read_header

        spec = self.options.adapter
        paths = shipped_adapters() if spec == "auto" else [] if spec == "init" else [Path(spec).expanduser()]
        shares = []
        for path in paths:
            try:
                c = read_header(path)["config"]
            except (BadInputError, OSError):  # an upstream checkpoint directory, a missing file: the default
                continue
            shares.append(len(c.cross_layers) / c.n_layers)
        return max(shares, default=0.25)

    def fixed_bytes(self, manifest):
        """The KV cache of the prompt prefix and the recent tail ("pk", "pv", "rk", "rv": every layer), which
        each memory carries once and no budget prunes."""
        from math import prod

        from ...memory.format import DTYPES

        return sum(DTYPES[dtype] * prod(shape) for chunk in manifest.get("chunks", [])
                   for name, (dtype, shape) in (chunk.get("tensors") or {}).items() if name in _CACHED)

    def spec_problem(self, specs, tokens, geometry):
        """"adapter" uint8 [32]; "pk", "pv" [layers, kv_heads, prefix, head_dim] where the prompt prefix ends;
        "rk", "rv" [layers, kv_heads, tail tokens, head_dim] where the recent tail is; "k.i", "v.i" [kv_heads,
        kept tokens, head_dim] per cross layer i (fewer than the decoder's layers)."""
        L, H, D = geometry
        if specs.get("adapter") != ["U8", [32]]:
            return f"tensor 'adapter' is {specs.get('adapter')}, expected U8 [32]"
        for name, (dtype, shape) in specs.items():
            if name == "adapter":
                continue
            kind, _, index = name.partition(".")
            if kind in _CACHED and not index:
                ok = len(shape) == 4 and [shape[0], shape[1], shape[3]] == [L, H, D]
                ok = ok and (kind[0] == "p" or shape[2] <= tokens)  # the prefix may span chunks, a tail part not
            elif kind in ("k", "v") and index.isdigit() and int(index) < L:
                ok = len(shape) == 3 and shape[1] <= tokens and [shape[0], shape[2]] == [H, D]
            else:
                return f"unknown tensor {name!r}"
            if dtype not in FLOATS or not ok:
                return f"tensor {name!r} is {dtype} {shape}, which does not fit the model"
        return None

    def attach(self, model, manifest, blocks):
        import torch

        from .modules import KWARG, CrossInput, install_hooks

        self.check_memory(model, manifest)
        adapter, digest = resolve_adapter(model, self.options.adapter)
        X = len(adapter.config.cross_layers)
        dev, dt = model.device, model.dtype
        pk = pv = None
        rk: list = []
        rv: list = []
        keys: list[list] = [[] for _ in range(X)]
        values: list[list] = [[] for _ in range(X)]
        for record, t in blocks:
            if bytes(t["adapter"].tolist()) != digest:
                raise IncompatibleMemoryError(
                    f"{manifest.get('name')}: encoded with another CombLlama adapter than {self.options.adapter!r} "
                    f"resolves to now; ingest again with --force")
            if "pk" in t:
                pk, pv = t["pk"], t["pv"]
            if "rk" in t:
                rk.append(t["rk"])
                rv.append(t["rv"])
            for i in range(X):
                if f"k.{i}" in t:
                    keys[i].append(t[f"k.{i}"])
                    values[i].append(t[f"v.{i}"])
        if pk is None:
            raise CorruptMemoryError(f"{manifest.get('name')}: the prompt prefix cache is missing")
        L = model.config.num_hidden_layers
        if pk.shape[0] != L:
            raise IncompatibleMemoryError(f"{manifest.get('name')}: {pk.shape[0]} layers, the model has {L}")
        P = pk.shape[2]
        if rk:
            pk, pv = torch.cat([pk, *rk], 2), torch.cat([pv, *rv], 2)
        cache = make_cache([(pk[i][None].to(dev, dt), pv[i][None].to(dev, dt)) for i in range(L)])
        n = pk.shape[2]
        cross = None
        if keys[0]:
            cross = CrossInput(adapter, [torch.cat(k, 1)[None].to(dev, dt) for k in keys],
                               [torch.cat(v, 1)[None].to(dev, dt) for v in values])
            cache.attention_kwargs = {KWARG: cross}
            install_hooks(model)
        return CombMemory(cache, n, [n] * L, [], cross, P, model.model.rotary_emb)
