"""The fast answering path: a Llama forward over a StaticKV, batch 1, with the decode step captured
in a CUDA graph.

It reuses the model's own modules (projections, norms, MLP, rotary embedding) and replaces only the
cache and attention plumbing: the memory part goes through one fused kernel (fast/attention.py), the
turn's own tokens through a small masked part, merged exactly by log-sum-exp. What a memory adds before
each layer (KVMemory.pre_layer: CombLlama's cross blocks over its fixed cross memory) runs inside the same
step. A decode step then has fixed shapes and addresses, so one graph replay per token removes the launch
overhead that dominates plain transformers at batch 1. Knows nothing of files, text or sampling.
"""
from __future__ import annotations

from . import attention

SUPPORTED = ("llama",)


def eligible(model) -> str | None:
    """None when the fast path can run `model`, else why not."""
    c = model.config
    if c.model_type not in SUPPORTED:
        return f"model type {c.model_type!r} (fast path: {', '.join(SUPPORTED)})"
    if getattr(c, "sliding_window", None):
        return "sliding-window attention"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not hasattr(layers[0], "self_attn") or not hasattr(model.model, "rotary_emb"):
        return "unexpected module layout"
    if not all(hasattr(n, "variance_epsilon") for n in (layers[0].input_layernorm, model.model.norm)):
        return "not an RMSNorm model"
    return None


def rms_norm(x, norm):
    """LlamaRMSNorm(x) as one fused kernel instead of ~8 small ones (a decode step runs 2 × layers + 1 of
    them). Statistics in float32 either way; in bf16 the weight is applied before the one rounding, where
    transformers rounds, multiplies and rounds again (closer to fp32, not bit-equal; equal in fp32)."""
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps=norm.variance_epsilon)


def rope_qk(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (rotate-half convention) on q [1, Hq, T, D] and k [1, Hkv, T, D]
    together: 6 kernels for both instead of ~5 each. cos, sin: [1, T, D]."""
    import torch

    x = torch.cat((q, k), 1)  # [1, Hq + Hkv, T, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, -1)
    x = x * cos + torch.cat((-x2, x1), -1) * sin
    return x[:, :q.shape[1]], x[:, q.shape[1]:]


class FastDecoder:
    """prefill(ids, pos) and step(token, pos) → logits [vocab] of the last token; tokens are written to
    `static`'s turn slots in order. `use_graph` captures the step on first use (CUDA only)."""

    def __init__(self, model, static, *, use_graph: bool | None = None, backend: str | None = None,
                 unified: bool | None = None, num_splits: int | None = None, pre_layer=None):
        import torch

        why = eligible(model)
        if why is not None:
            raise ValueError(f"fast decoding does not support this model: {why}")
        self.model, self.static = model, static
        self.pre_layer = pre_layer  # KVMemory.pre_layer(): f(layer index, h) run before each layer, or None
        dev, dt = static.mem_k[0].device, static.mem_k[0].dtype
        self.backend = attention.choose(dev.type, dt, backend)
        self.use_graph = dev.type == "cuda" if use_graph is None else bool(use_graph and dev.type == "cuda")
        # unified: a decode step reads memory and turn in one kernel (attention.attend_prefix) instead of
        # a memory kernel + a masked turn part + a log-sum-exp merge (~25 small kernels a layer).
        self.unified = attention.prefix_available(dev.type, dt) if unified is None else bool(unified)
        self.num_splits = num_splits
        self._cu_q = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        self._cu_k, self._cu_k_n = None, 0
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self._graph = None
        self._graph_key = None
        self._logits = None
        self._burst = self._burst_key = self._picked = None  # greedy_steps' graph
        self.vocab = model.get_input_embeddings().num_embeddings

    def _check_ids(self, ids: list[int]) -> None:
        """Refuse token ids outside the embedding table on the host: on CUDA the lookup would fail as a
        device-side assert, which poisons the process's CUDA context (no later call can run)."""
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab - 1})")

    # -- the forward ---------------------------------------------------------------------------------
    def _forward(self, ids, pos, slot, decode: bool):
        """ids, pos: [1, T] device tensors. Writes K/V at turn slots [slot, slot + T) (`slot` an int, or
        the 0-d device tensor `static.used_t` when decode). Returns logits [1, vocab] of the last token."""
        import torch

        m, st = self.model, self.static
        inner = m.model
        h = inner.embed_tokens(ids)  # [1, T, hidden]
        cos, sin = inner.rotary_emb(h, pos)
        T = ids.shape[1]
        M = st.memory_length
        unified = decode and self.unified
        if unified:
            n_keys = (slot + (M + 1)).to(torch.int32).view(1)  # memory + the turn through this token
            if self._cu_k is None or self._cu_k_n != st.k[0].shape[2]:  # made in warm-up, never in a capture
                self._cu_k_n = st.k[0].shape[2]
                self._cu_k = torch.tensor([0, self._cu_k_n], dtype=torch.int32, device=ids.device)
        for li, layer in enumerate(inner.layers):
            if self.pre_layer is not None:
                h = self.pre_layer(li, h)
            a = layer.self_attn
            x = rms_norm(h, layer.input_layernorm)
            hd = a.head_dim
            q = a.q_proj(x).view(1, T, -1, hd).transpose(1, 2)  # [1, Hq, T, D]
            k = a.k_proj(x).view(1, T, -1, hd).transpose(1, 2)  # [1, Hkv, T, D]
            v = a.v_proj(x).view(1, T, -1, hd).transpose(1, 2)
            q, k = rope_qk(q, k, cos, sin)
            tk, tv = st.tail_k[li], st.tail_v[li]
            if unified:
                tk.index_copy_(2, slot.view(1), k)
                tv.index_copy_(2, slot.view(1), v)
                o = attention.attend_prefix(q, st.k[li], st.v[li], n_keys, self._cu_q, self._cu_k, scale=a.scaling,
                                            num_splits=self.num_splits)
            elif decode:
                tk.index_copy_(2, slot.view(1), k)
                tv.index_copy_(2, slot.view(1), v)
                o, lse = attention.masked_tail(q, tk, tv, slot + 1, scale=a.scaling)
            else:
                tk[:, :, slot:slot + T] = k
                tv[:, :, slot:slot + T] = v
                if slot == 0:  # the turn so far is exactly these tokens: a causal fused kernel
                    o, lse = attention.attend(q, k, v, scale=a.scaling, causal=True, backend=self.backend)
                else:
                    o, lse = attention.masked_tail(q, tk, tv, slot + T, scale=a.scaling)
            if M and not unified:
                om, lm = attention.attend(q, st.mem_k[li], st.mem_v[li], scale=a.scaling, backend=self.backend)
                o, _ = attention.merge(om, lm, o, lse)
            o = o.transpose(1, 2).reshape(1, T, -1)  # [1, T, Hq*D]
            h = h + a.o_proj(o)
            h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm))
        h = rms_norm(h[:, -1:], inner.norm)
        return m.lm_head(h)[:, -1]  # [1, vocab]

    # -- public --------------------------------------------------------------------------------------
    def prefill(self, ids: list[int], pos: int):
        """Run the turn's prompt `ids` at logical positions pos.. after the current turn slots."""
        import torch

        st = self.static
        if st.used + len(ids) > st.capacity:
            raise ValueError(f"turn buffer full ({st.used} + {len(ids)} > {st.capacity})")
        self._check_ids(ids)
        dev = st.mem_k[0].device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        p = torch.arange(pos, pos + len(ids), device=dev)[None]
        with torch.no_grad():
            logits = self._forward(x, p, st.used, decode=False)[0]
        st.used += len(ids)
        st.used_t.fill_(st.used)
        return logits

    def step(self, token: int, pos: int):
        """One decode step for `token` at logical position `pos`; returns logits [vocab] (a buffer that
        the next step overwrites when graphs are used)."""
        import torch

        self._begin(token, pos, 1)
        with torch.no_grad():
            if not self.use_graph:
                out = self._forward(self._tok, self._pos, self.static.used_t, decode=True)[0]
            else:
                if self._graph is None or self._graph_key != self._key():
                    self._capture()
                self._graph.replay()
                out = self._logits[0]
        self._end(1)
        return out

    def greedy_steps(self, token: int, pos: int, k: int) -> list[int]:
        """k greedy decode steps: `token` at logical position `pos`, then each step's argmax fed to the next
        on the device (one CUDA graph for all k when graphs are used). Returns the k tokens picked, brought to
        the host at once: one synchronisation per k tokens instead of one per token."""
        import torch

        self._begin(token, pos, k)
        with torch.no_grad():
            if not self.use_graph:
                picked = self._greedy_body(k)
            else:
                key = (self._key(), k)
                if self._burst is None or self._burst_key != key:
                    self._capture_burst(k)
                self._burst.replay()
                picked = self._picked
            out = picked.tolist()
        self._end(k)
        return out

    def _begin(self, token: int, pos: int, n: int) -> None:
        """Room for n more turn slots, a valid token, and the step's device inputs set."""
        if self.static.used + n > self.static.capacity:
            raise ValueError(f"turn buffer full ({self.static.capacity} slots)")
        self._check_ids([token])
        self._tok.fill_(token)
        self._pos.fill_(pos)

    def _end(self, n: int) -> None:
        st = self.static
        st.used += n
        st.used_t.fill_(st.used)

    def _greedy_body(self, k: int):
        """The k steps on the device: advances _tok, _pos and used_t; returns the picks [k] (long)."""
        import torch

        picked = []
        for _ in range(k):
            nxt = self._forward(self._tok, self._pos, self.static.used_t, decode=True).argmax(-1)  # [1]
            picked.append(nxt)
            self._tok.copy_(nxt.view(1, 1))
            self._pos.add_(1)
            self.static.used_t.add_(1)
        return torch.cat(picked)

    def _capture_burst(self, k: int) -> None:
        """As _capture, for greedy_steps: the warm-up runs advance _tok, _pos and used_t, so they are put back
        before each run and before the replay (the K/V the warm-up wrote are the ones the replay rewrites)."""
        import torch

        st = self.static
        saved = [t.clone() for t in (self._tok, self._pos, st.used_t)]

        def restore():
            for t, v in zip((self._tok, self._pos, st.used_t), saved):
                t.copy_(v)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                restore()
                self._greedy_body(k)
            restore()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._picked = self._greedy_body(k)
        self._burst, self._burst_key = graph, (self._key(), k)

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, kernel selection), then record one step. Warm-up runs
        the real step (same slot, same inputs), so it leaves no trace beyond what the replay writes."""
        import torch

        st = self.static
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._forward(self._tok, self._pos, st.used_t, decode=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward(self._tok, self._pos, st.used_t, decode=True)
        self._graph, self._graph_key = graph, self._key()

    def _key(self) -> tuple:
        """What a captured graph depends on: the buffers (and their generation) and the decode variant."""
        return self.static.generation, id(self.static), self.unified, self.num_splits


def warm_up(model, tokens: int = 16) -> None:
    """Run the fast path once over a throwaway 16-entry memory, so that a process's first answer does not
    pay the one-off costs of its first forward (library handles, kernel modules loaded on first launch).
    The caller may run it while the memory is still being read from disk, when the device is idle."""
    import torch

    from .static_cache import StaticKV

    if eligible(model) is not None:
        return
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    static = StaticKV.allocate(c.num_hidden_layers, c.num_key_value_heads, D, tokens, tokens, device=model.device,
                               dtype=model.dtype)
    for b in (*static.mem_k, *static.mem_v):
        b.zero_()
    dec = FastDecoder(model, static, use_graph=False)
    dec.prefill(list(range(tokens // 2)), tokens)
    dec.step(0, tokens + tokens // 2)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def fast_decoder(model, memory, capacity: int, *, use_graph: bool | None = None) -> FastDecoder:
    """The decoder serving `memory` (a KVMemory of equal-length layers) with room for `capacity` turn tokens,
    kept on the memory's cache so that every Engine over the same memory shares its buffers and captured graph."""
    from .static_cache import StaticKV

    cache = memory.cache
    dec = getattr(cache, "_combllama_fast", None)
    if dec is None or dec.model is not model or dec.static.memory_length != memory.lengths[0]:
        static = getattr(cache, "_combllama_static", None)
        if static is None or static.memory_length != memory.lengths[0]:
            static = StaticKV.adopt(memory, max(capacity, 256))
        dec = FastDecoder(model, static, use_graph=use_graph, pre_layer=memory.pre_layer())
        cache._combllama_fast = dec
    if use_graph is not None:
        dec.use_graph = bool(use_graph and dec.static.mem_k[0].is_cuda)
    dec.static.ensure_capacity(capacity)
    dec.static.reset()
    return dec
