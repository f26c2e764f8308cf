"""CombLlama's tensor modules: low-rank linear maps over frozen copies, the two chunk encoders (bidirectional
copied layers, or the frozen base model's own states), the tanh-gated cross-attention blocks, and the decoder
hooks through which a frozen base model reads a cross memory. Pure torch math with shapes documented.

Knows nothing of files, memories or the engine (method.py) nor of training (train/). The base model is
never modified: its parameters stay as they are, and the hooks act only when a forward call carries a
`combllama_cross` keyword (a `CrossInput`), so without one the model is exactly the base model.

Notation: d hidden size, H query heads, Hkv KV heads, D head dim, F MLP width, X cross layers,
N packed encoder tokens, M memory tokens of one cross layer, B batch, n decoder tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInputError

KWARG = "combllama_cross"  # the forward keyword the decoder hooks read
ENCODERS = ("stack", "base")  # CombConfig.encoder: see BaseStateEncoder and ChunkEncoder
POSITIONS = ("chunk", "document")  # CombConfig.positions: where "base" puts a chunk's keys
USE_VARLEN = True  # training turns it off where the varlen kernel fails its forward/backward check


def default_cross_layers(n_layers: int, every: int = 4) -> tuple[int, ...]:
    """Decoder layers that get a cross block in front of them: every `every`-th (3, 7, 11... for 30 layers);
    a model shallower than `every` gets one, before its last layer."""
    layers = tuple(range(every - 1, n_layers, every))
    return layers or (n_layers - 1,)


@dataclass(frozen=True)
class CombConfig:
    """Shapes and switches of one adapter. Stored in the adapter file; `rank=0` means full weights
    (upstream checkpoints), otherwise rank-r deltas over the copied decoder weights."""

    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    n_layers: int  # of the base decoder
    cross_layers: tuple[int, ...]
    rank: int = 32
    qk_norm: bool = False  # per-head RMSNorm on cross queries and memory keys (the reference has it)
    kv_norm: bool = True  # RMSNorm before the memory K/V projections (copied from the source layer's input norm)
    chunk_order: bool = True  # learned chunk-index embedding added to the encoder input (§3.6 proposal 1)
    max_chunks: int = 256  # chunk indices beyond this share the last embedding
    # "stack": X bidirectional layers, layer i a copy of decoder layer X[i] run on the embeddings (the
    # reference's successor plan). "base": the frozen base model itself reads each chunk (causal, after a
    # sink token) and cross layer i's memory is decoder layer X[i]'s own K/V of it, keys rotated as if the
    # chunk ended just before the query: at initialisation a cross block reads what that layer would read.
    encoder: str = "stack"
    sink_token: int = 0  # "base": the token put before every chunk (its K/V are dropped; it takes the sink)
    # A learned key per KV head with a zero value beside the memory: a query that finds nothing in the memory
    # can put its attention there, so the block's output shrinks instead of averaging unrelated tokens.
    null_slot: bool = False
    # "base" key positions. "chunk": every chunk's keys at -n..-1, as if each chunk ended just before the query.
    # "document": chunk keys also count the memory tokens after the chunk (-n-a..-1-a), so the memory keeps the
    # distances of the text the way a KV cache does, and recency-reading heads find the text's last tokens.
    positions: str = "chunk"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_layers", tuple(int(i) for i in self.cross_layers))
        if not self.cross_layers or list(self.cross_layers) != sorted(set(self.cross_layers)):
            raise BadInputError("combllama cross_layers must be distinct, ascending and non-empty")
        if self.cross_layers[0] < 0 or self.cross_layers[-1] >= self.n_layers:
            raise BadInputError(f"combllama cross_layers must lie in [0, {self.n_layers})")
        if self.rank < 0 or self.max_chunks < 1:
            raise BadInputError("combllama rank must be >= 0 and max_chunks >= 1")
        if self.n_heads % self.n_kv_heads:
            raise BadInputError("query heads must be a multiple of KV heads")
        if self.encoder not in ENCODERS:
            raise BadInputError(f"combllama encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}")
        if self.sink_token < 0:
            raise BadInputError("combllama sink_token must be a token id")
        if self.positions not in POSITIONS:
            raise BadInputError(f"combllama positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")

    @classmethod
    def for_model(cls, config, **overrides) -> "CombConfig":
        """The config of a Llama-family transformers `config`, cross layers every 4th by default."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = dict(hidden_size=config.hidden_size, n_heads=config.num_attention_heads,
                    n_kv_heads=config.num_key_value_heads, head_dim=head_dim,
                    intermediate_size=config.intermediate_size, rms_eps=float(config.rms_norm_eps),
                    n_layers=config.num_hidden_layers, cross_layers=default_cross_layers(config.num_hidden_layers))
        if overrides.get("encoder") == "base":  # "stack" has no sink: 0 keeps older adapter files' configs equal
            base["sink_token"] = int(getattr(config, "bos_token_id", None) or 0)
        return cls(**{**base, **overrides})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CombConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise BadInputError(f"combllama adapter config has unknown fields {sorted(unknown)} (a newer combllama?)")
        return cls(**data)


# --- building blocks ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Llama's RMSNorm over the last dim (statistics in float32)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LowRankLinear(nn.Module):
    """y = x W0ᵀ + (x Aᵀ) Bᵀ: W0 [out, in] frozen (shared with the base model, never in the state dict),
    A [r, in] and B [out, r] trained; B starts at zero so the map starts as W0. rank 0: W0 alone."""

    def __init__(self, base: torch.Tensor, rank: int):
        super().__init__()
        self.register_buffer("base", base.detach(), persistent=False)
        out_f, in_f = base.shape
        self.rank = rank
        if rank:
            self.A = nn.Parameter(torch.randn(rank, in_f, dtype=base.dtype, device=base.device) / math.sqrt(in_f))
            self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=base.dtype, device=base.device))

    def forward(self, x):
        y = F.linear(x, self.base)
        if self.rank:
            y = y + F.linear(F.linear(x, self.A), self.B)
        return y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), [..., d] → [..., d]."""

    def __init__(self, w: dict, rank: int):
        super().__init__()
        self.gate = LowRankLinear(w["gate"], rank)
        self.up = LowRankLinear(w["up"], rank)
        self.down = LowRankLinear(w["down"], rank)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def layer_weights(layer) -> dict:
    """The tensors of a transformers Llama decoder layer that CombLlama copies, by short name."""
    a, m = layer.self_attn, layer.mlp
    return {"q": a.q_proj.weight, "k": a.k_proj.weight, "v": a.v_proj.weight, "o": a.o_proj.weight,
            "gate": m.gate_proj.weight, "up": m.up_proj.weight, "down": m.down_proj.weight,
            "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight}


def rope(x, cos, sin):
    """Rotate x [N, heads, D] by cos/sin [N, D] (Llama's rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def packed_attention(q, k, v, cu_seqlens, max_len: int):
    """Bidirectional attention inside each packed sequence: q [N, H, D], k/v [N, Hkv, D], cu_seqlens
    int32 [S+1] (sequence starts, then N) → [N, H, D]. Flash varlen kernels on CUDA when present
    (torch.nn.attention.varlen, else flash-attn), else SDPA with a block-diagonal mask."""
    H, Hkv = q.shape[1], k.shape[1]
    if USE_VARLEN and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        try:
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, kr, vr, cu_seqlens, cu_seqlens, max_len, max_len)
        except (ImportError, TypeError, RuntimeError):
            pass
        try:
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func(q, kr, vr, cu_seqlens, cu_seqlens, max_len, max_len, causal=False)
        except ImportError:
            pass
    N = q.shape[0]
    if q.is_cuda and cu_seqlens.numel() > 2:  # no varlen kernel: pad the sequences into a batch
        cu = cu_seqlens.long()
        lens = cu[1:] - cu[:-1]
        ar = torch.arange(max_len, device=q.device)
        valid = ar[None] < lens[:, None]  # [S, max_len]
        idx = (cu[:-1, None] + ar[None]).clamp(max=N - 1)
        pad = lambda x: x[idx].transpose(1, 2)  # noqa: E731  [S, heads, max_len, D]
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :],
                                             enable_gqa=H != Hkv)
        return out.transpose(1, 2)[valid]
    if cu_seqlens.numel() == 2:
        mask = None
    else:
        seq = torch.bucketize(torch.arange(N, device=q.device), cu_seqlens[1:].to(q.device), right=True)  # [N]
        mask = (seq[:, None] == seq[None, :])[None, None]  # [1, 1, N, N]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, enable_gqa=H != Hkv)  # [1, H, N, D]
    return out[0].transpose(0, 1)


# --- encoder ------------------------------------------------------------------------------------------------

class EncoderLayer(nn.Module):
    """A Llama decoder layer made bidirectional and chunk-local: [N, d] → [N, d]."""

    def __init__(self, c: CombConfig, w: dict):
        super().__init__()
        self.c = c
        self.ln1 = RMSNorm(w["ln1"], c.rms_eps)
        self.q, self.k, self.v, self.o = (LowRankLinear(w[n], c.rank) for n in ("q", "k", "v", "o"))
        self.ln2 = RMSNorm(w["ln2"], c.rms_eps)
        self.mlp = MLP(w, c.rank)

    def forward(self, h, cos, sin, cu_seqlens, max_len: int):
        c, N = self.c, h.shape[0]
        x = self.ln1(h)
        q = rope(self.q(x).view(N, c.n_heads, c.head_dim), cos, sin)
        k = rope(self.k(x).view(N, c.n_kv_heads, c.head_dim), cos, sin)
        v = self.v(x).view(N, c.n_kv_heads, c.head_dim)
        a = packed_attention(q, k, v, cu_seqlens, max_len).reshape(N, c.n_heads * c.head_dim)
        h = h + self.o(a)
        return h + self.mlp(self.ln2(h))


class MemoryProjection(nn.Module):
    """Encoder states → one cross layer's memory: h [N, d] → K, V [N, Hkv, D] (K after k_norm, if any)."""

    def __init__(self, c: CombConfig, w: dict):
        super().__init__()
        self.c = c
        self.norm = RMSNorm(w["ln1"], c.rms_eps) if c.kv_norm else None
        self.k = LowRankLinear(w["k"], c.rank)
        self.v = LowRankLinear(w["v"], c.rank)
        self.k_norm = RMSNorm(w.get("k_norm", torch.ones(c.head_dim, dtype=w["k"].dtype, device=w["k"].device)),
                              c.rms_eps) if c.qk_norm else None

    def forward(self, h):
        c, N = self.c, h.shape[0]
        x = self.norm(h) if self.norm is not None else h
        k = self.k(x).view(N, c.n_kv_heads, c.head_dim)
        v = self.v(x).view(N, c.n_kv_heads, c.head_dim)
        return (self.k_norm(k) if self.k_norm is not None else k), v


class ChunkEncoder(nn.Module):
    """X bidirectional layers over chunks (RoPE positions restart at 0 in every chunk), one memory
    projection after each. Token embeddings and rotary tables are the base model's (shared, not owned)."""

    def __init__(self, c: CombConfig, layers: list[dict], projections: list[dict]):
        super().__init__()
        self.c = c
        self.layers = nn.ModuleList(EncoderLayer(c, w) for w in layers)
        self.proj = nn.ModuleList(MemoryProjection(c, w) for w in projections)
        ref = layers[0]["q"]
        self.chunk_embed = (nn.Parameter(torch.zeros(c.max_chunks, c.hidden_size, dtype=ref.dtype, device=ref.device))
                            if c.chunk_order else None)

    def run(self, model, ids, cu_seqlens, chunk_index=None, after=None):
        """Token ids [N] packed by cu_seqlens int32 [S+1] → X pairs (K, V) [N, Hkv, D] (chunk-local RoPE;
        `after` is for the base encoder's key positions and unused here)."""
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        pos = torch.arange(ids.shape[0], device=ids.device) - torch.repeat_interleave(cu_seqlens[:-1].long(), lens.long())
        embeds = model.get_input_embeddings()(ids)
        cos, sin = model.model.rotary_emb(embeds[None], pos[None])  # [1, N, D]
        return self(embeds, cos[0], sin[0], cu_seqlens, int(lens.max()), chunk_index)

    def forward(self, embeds, cos, sin, cu_seqlens, max_len: int, chunk_index=None):
        """embeds [N, d]; cos/sin [N, D]; chunk_index [N] long (None: no order signal) →
        X pairs (K, V), each [N, Hkv, D]."""
        h = embeds
        if self.chunk_embed is not None and chunk_index is not None:
            h = h + self.chunk_embed[chunk_index.clamp(max=self.c.max_chunks - 1)].to(h.dtype)
        out = []
        for layer, proj in zip(self.layers, self.proj):
            h = layer(h, cos, sin, cu_seqlens, max_len)
            out.append(proj(h))
        return out


def pad_chunks(ids, cu_seqlens, pad: int):
    """Packed ids [N] → right-padded batch [S, Lmax] and its mask [S, Lmax] bool (True = a token)."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    ar = torch.arange(int(lens.max()), device=ids.device)
    valid = ar[None] < lens[:, None]
    idx = (cu[:-1, None] + ar[None]).clamp(max=ids.shape[0] - 1)
    return torch.where(valid, ids[idx], torch.full_like(ids[idx], pad)), valid


class BaseStateEncoder(nn.Module):
    """The "base" encoder: the frozen base model reads every chunk alone (causal, a sink token first, chunk
    positions 1..n), and cross layer i's memory is the memory projection (decoder layer X[i]'s own input norm
    and k/v maps, plus trained low-rank deltas) of the hidden state entering layer X[i]. Keys are rotated at
    positions -n-a..-1-a relative to an unrotated query (position 0), a = `after[s]`, the memory tokens that
    follow chunk s (CombConfig.positions "document"; 0 for "chunk": every chunk ends just before it). Owns only
    the projections and the chunk-index embedding (added to the hidden state before each projection)."""

    def __init__(self, c: CombConfig, projections: list[dict]):
        super().__init__()
        self.c = c
        self.proj = nn.ModuleList(MemoryProjection(c, w) for w in projections)
        ref = projections[0]["k"]
        self.chunk_embed = (nn.Parameter(torch.zeros(c.max_chunks, c.hidden_size, dtype=ref.dtype, device=ref.device))
                            if c.chunk_order else None)

    def run(self, model, ids, cu_seqlens, chunk_index=None, after=None):
        """Token ids [N] packed by cu_seqlens int32 [S+1], after [S] long or None (zeros) → X pairs (K, V)
        [N, Hkv, D]. No gradient reaches the base model: its states are constants, only the projections and
        chunk embeddings learn."""
        c = self.c
        batch, valid = pad_chunks(ids, cu_seqlens, c.sink_token)  # [S, L]
        S = batch.shape[0]
        x = torch.cat([torch.full((S, 1), c.sink_token, dtype=batch.dtype, device=batch.device), batch], 1)
        mask = torch.cat([torch.ones(S, 1, dtype=torch.bool, device=valid.device), valid], 1).long()
        with torch.no_grad():
            states = model.model(input_ids=x, attention_mask=mask, output_hidden_states=True,
                                 use_cache=False).hidden_states  # L+1 × [S, 1+Lmax, d]; [j] enters layer j
        lens = valid.sum(1, keepdim=True)  # [S, 1]
        pos = torch.arange(batch.shape[1], device=ids.device)[None] - lens  # token j of a chunk of n: j - n
        if after is not None:
            pos = pos - after.to(pos.device, pos.dtype)[:, None]
        cos, sin = model.model.rotary_emb(states[0], pos)  # [S, Lmax, D]
        cos, sin = cos[valid], sin[valid]  # [N, D], packed order
        out = []
        for layer, proj in zip(c.cross_layers, self.proj):
            h = states[layer][:, 1:][valid]  # [N, d]
            if self.chunk_embed is not None and chunk_index is not None:
                h = h + self.chunk_embed[chunk_index.clamp(max=c.max_chunks - 1)].to(h.dtype)
            k, v = proj(h)
            out.append((rope(k, cos.to(k.dtype), sin.to(k.dtype)), v))
        return out


# --- cross attention ----------------------------------------------------------------------------------------

class CrossBlock(nn.Module):
    """h ← h + tanh(g_a)·O(attn(Q(norm h), K, V)); h ← h + tanh(g_m)·MLP(norm h). No positions inside.
    With null_slot, K and V get one more entry per KV head: a learned key whose value is zero.

    h [B, n, d]; K, V [B, Hkv, M, D]; key_mask [B, M] bool (True = attend) or None."""

    def __init__(self, c: CombConfig, w: dict):
        super().__init__()
        self.c = c
        self.ln1 = RMSNorm(w["ln1"], c.rms_eps)
        self.q = LowRankLinear(w["q"], c.rank)
        self.o = LowRankLinear(w["o"], c.rank)
        self.q_norm = RMSNorm(w.get("q_norm", torch.ones(c.head_dim, dtype=w["q"].dtype, device=w["q"].device)),
                              c.rms_eps) if c.qk_norm else None
        self.ln2 = RMSNorm(w["ln2"], c.rms_eps)
        self.mlp = MLP(w, c.rank)
        dev = w["q"].device
        self.null_key = (nn.Parameter(torch.zeros(c.n_kv_heads, c.head_dim, dtype=w["q"].dtype, device=dev))
                         if c.null_slot else None)
        self.attn_gate = nn.Parameter(w.get("attn_gate", torch.zeros(1, device=dev)).float().clone())
        self.mlp_gate = nn.Parameter(w.get("mlp_gate", torch.zeros(1, device=dev)).float().clone())

    def queries(self, h):
        """[B, n, d] → Q [B, H, n, D] (after q_norm, if any)."""
        c = self.c
        B, n, _ = h.shape
        q = self.q(self.ln1(h)).view(B, n, c.n_heads, c.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q.transpose(1, 2)

    def with_null(self, k, v, key_mask=None):
        """The memory as attention reads it: K, V [Bm, Hkv, M (+1), D] and key_mask [Bm, M (+1)] or None, with
        the null slot (a learned key whose value is zero) appended when the adapter has one."""
        if self.null_key is None:
            return k, v, key_mask
        # the memory's batch may be 1 for B queries (SDPA broadcasts it): follow the memory's
        null = self.null_key.to(k.dtype)[None, :, None, :].expand(k.shape[0], -1, 1, -1)  # [Bm, Hkv, 1, D]
        k, v = torch.cat([k, null], 2), torch.cat([v, torch.zeros_like(null, dtype=v.dtype)], 2)
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], 1)], 1)
        return k, v, key_mask

    def forward(self, h, k, v, key_mask=None, scorer: Callable | None = None):
        """The block over a raw memory (as encoded); `scorer(q, k, key_mask)` sees it before the null slot."""
        q = self.queries(h)
        if scorer is not None:
            scorer(q, k, key_mask)
        return self._attend(h, q, *self.with_null(k, v, key_mask))

    def read(self, h, k, v, key_mask=None):
        """The block over a memory that already went through with_null (CrossInput.layer prepares it once,
        so a decode step does not copy the memory to append one entry)."""
        return self._attend(h, self.queries(h), k, v, key_mask)

    def _attend(self, h, q, k, v, key_mask):
        c = self.c
        B, n, _ = h.shape
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=c.n_heads != c.n_kv_heads)  # [B, H, n, D]
        a = a.transpose(1, 2).reshape(B, n, c.n_heads * c.head_dim)
        h = h + torch.tanh(self.attn_gate).to(h.dtype) * self.o(a)
        return h + torch.tanh(self.mlp_gate).to(h.dtype) * self.mlp(self.ln2(h))


class CombAdapter(nn.Module):
    """Everything CombLlama adds to a frozen base model: encoder + cross blocks. Its state dict holds the
    trained tensors only (low-rank factors, norms, gates, chunk embeddings); the copied decoder weights
    stay shared with the base model."""

    def __init__(self, c: CombConfig, encoder_weights: list[dict], projection_weights: list[dict],
                 cross_weights: list[dict]):
        super().__init__()
        if not len(encoder_weights) == len(projection_weights) == len(cross_weights) == len(c.cross_layers):
            raise BadInputError("combllama: one encoder layer, projection and cross block per cross layer")
        self.config = c
        self.encoder = (BaseStateEncoder(c, projection_weights) if c.encoder == "base"
                        else ChunkEncoder(c, encoder_weights, projection_weights))
        self.cross = nn.ModuleList(CrossBlock(c, w) for w in cross_weights)
        self.slot = {layer: i for i, layer in enumerate(c.cross_layers)}

    @classmethod
    def from_base(cls, model, c: CombConfig) -> "CombAdapter":
        """Encoder layer i and cross block i start as copies of decoder layer X[i]; the memory K/V
        projections as its k_proj/v_proj, the cross Q/O as its q_proj/o_proj; gates at zero."""
        layers = model.model.layers
        if len(layers) != c.n_layers:
            raise BadInputError(f"combllama adapter is for a {c.n_layers}-layer model, this one has {len(layers)}")
        w = [layer_weights(layers[i]) for i in c.cross_layers]
        return cls(c, w, w, w)

    def encode(self, model, ids, cu_seqlens, chunk_index=None, after=None):
        """Token ids [N] packed by cu_seqlens int32 [S+1] → X pairs (K, V) [N, Hkv, D]. `after` [S] long: the
        memory tokens that follow each chunk (read when config.positions is "document")."""
        return self.encoder.run(model, ids, cu_seqlens, chunk_index,
                                after if self.config.positions == "document" else None)


@dataclass
class CrossInput:
    """What a forward call passes as `combllama_cross`: the adapter and, per cross layer, the memory
    K, V [B, Hkv, M_i, D] with key_mask [B, M_i] bool or None. `scorer(slot, q, k, mask)` sees each
    cross layer's queries (for pruning)."""

    adapter: CombAdapter
    keys: list
    values: list
    masks: list = field(default_factory=list)
    scorer: Any = None
    _ready: dict = field(default_factory=dict, init=False, repr=False)  # slot → memory after with_null

    def entries(self) -> int:
        """KV entries (token × KV head) summed over cross layers."""
        return sum(int(k.shape[0] * k.shape[1] * k.shape[2]) if m is None else int(m.sum()) * int(k.shape[1])
                   for k, m in zip(self.keys, self.masks or [None] * len(self.keys)))

    def layer(self, slot: int):
        """Cross layer `slot`'s memory (K, V, key_mask) with the null slot appended, made once. The raw
        keys/values are then re-pointed at views of it, so the memory is not held twice."""
        if slot not in self._ready:
            k, v = self.keys[slot], self.values[slot]
            mask = self.masks[slot] if self.masks else None
            ready = self.adapter.cross[slot].with_null(k, v, mask)
            self._ready[slot] = ready
            if ready[0] is not k:
                M = k.shape[2]
                self.keys[slot], self.values[slot] = ready[0][:, :, :M], ready[1][:, :, :M]
                if self.masks:
                    self.masks[slot] = ready[2][:, :M]
        return self._ready[slot]

    def pre_layer(self, layer_idx: int, h):
        """h [B, n, d] entering decoder layer `layer_idx` → h after its cross block (unchanged where none)."""
        slot = self.adapter.slot.get(layer_idx)
        if slot is None:
            return h
        if self.scorer is not None:
            mask = self.masks[slot] if self.masks else None
            return self.adapter.cross[slot](h, self.keys[slot], self.values[slot], mask,
                                            lambda q, k, m: self.scorer(slot, q, k, m))
        return self.adapter.cross[slot].read(h, *self.layer(slot))


def _pre_hook(module, args, kwargs):
    ci = kwargs.get(KWARG)
    if ci is None or module.self_attn.layer_idx not in ci.adapter.slot:
        return None
    h = ci.pre_layer(module.self_attn.layer_idx, args[0] if args else kwargs["hidden_states"])
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def install_hooks(model) -> None:
    """Let `model`'s decoder layers read a `combllama_cross` keyword (idempotent; no effect without it)."""
    if getattr(model, "_combllama_hooks", None):
        return
    handles = [layer.register_forward_pre_hook(_pre_hook, with_kwargs=True) for layer in model.model.layers]
    model._combllama_hooks = handles
