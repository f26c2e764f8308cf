"""CombLlama: the untrained adapter is the base model exactly, it starts as copies of decoder layers,
memories go through disk and back, the budget prunes the cross memory, adapters round-trip through one
safetensors file, and the default method switches only for the model an adapter was trained for."""
from __future__ import annotations

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import IncompatibleMemoryError, UnsupportedVersionError
from combllama.core.methods import Budget, default_method, from_manifest, get_method
from combllama.core.methods.base import prefill, trim_cache
from combllama.core.methods.combllama import method as comb_method
from combllama.core.methods.combllama.modules import (KWARG, CombAdapter, CombConfig, CrossInput,
                                                      default_cross_layers, install_hooks, packed_attention)
from combllama.core.methods.combllama.weights import (load_adapter, read_header, save_adapter,
                                                      weights_fingerprint)
from combllama.core.prompt import memory_prefix_ids, turn_ids


@pytest.fixture(scope="module")
def deep():
    """A random 8-layer Llama (cross blocks before layers 3 and 7)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    install_hooks(model)
    return model


def _memory(adapter, model, ids, cu):
    kv = adapter.encode(model, ids, cu, torch.zeros_like(ids))
    return CrossInput(adapter, [k.transpose(0, 1)[None] for k, _ in kv], [v.transpose(0, 1)[None] for _, v in kv])


def test_cross_layers_every_fourth():
    assert default_cross_layers(30) == (3, 7, 11, 15, 19, 23, 27)
    assert default_cross_layers(32) == (3, 7, 11, 15, 19, 23, 27, 31)
    assert default_cross_layers(2) == (1,)


ENCODERS = pytest.mark.parametrize("encoder", ["stack", "base"])


@pytest.mark.parametrize("encoder,null_slot", [("stack", False), ("base", False), ("base", True)])
def test_zero_gates_equal_the_base_model_exactly(deep, encoder, null_slot):
    adapter = CombAdapter.from_base(deep, CombConfig.for_model(deep.config, encoder=encoder, null_slot=null_slot))
    # Even trained-looking factors change nothing while the gates are zero.
    for name, p in adapter.named_parameters():
        if name.endswith(".B") or name.endswith("chunk_embed") or name.endswith("null_key"):
            p.data.normal_()
    ids = torch.randint(0, 128, (40,))
    cross = _memory(adapter, deep, ids, torch.tensor([0, 15, 40], dtype=torch.int32))
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        plain = deep(x).logits
        read = deep(x, **{KWARG: cross}).logits
    assert torch.equal(plain, read)
    for block in adapter.cross:
        block.attn_gate.data.fill_(0.3)
    with torch.no_grad():
        assert not torch.allclose(deep(x, **{KWARG: cross}).logits, plain, atol=1e-4)
        assert torch.equal(deep(x).logits, plain)  # without the keyword the hooks do nothing


def test_layers_start_as_copies_of_their_decoder_layer(deep):
    c = CombConfig.for_model(deep.config)
    adapter = CombAdapter.from_base(deep, c)
    x = torch.randn(5, 64)
    for i, li in enumerate(c.cross_layers):
        src = deep.model.layers[li]
        enc, proj, cross = adapter.encoder.layers[i], adapter.encoder.proj[i], adapter.cross[i]
        assert enc.q.base.data_ptr() == src.self_attn.q_proj.weight.data_ptr()  # shared, not copied
        assert torch.equal(enc.mlp.down(x.new_zeros(5, 128) + 1), src.mlp.down_proj(x.new_zeros(5, 128) + 1))
        assert torch.equal(proj.k(x), src.self_attn.k_proj(x)) and torch.equal(proj.v(x), src.self_attn.v_proj(x))
        assert torch.equal(cross.q(x), src.self_attn.q_proj(x)) and torch.equal(cross.o(x), src.self_attn.o_proj(x))
        assert torch.equal(proj.norm.weight, src.input_layernorm.weight)
        assert float(cross.attn_gate.detach()) == 0.0 and float(cross.mlp_gate.detach()) == 0.0
    # The trained state is small: no copied decoder weight is in it.
    assert all(not k.endswith("base") for k in adapter.state_dict())


@ENCODERS
def test_packed_chunks_encode_as_if_alone(deep, encoder):
    adapter = CombAdapter.from_base(deep, CombConfig.for_model(deep.config, encoder=encoder))
    ids = torch.randint(0, 128, (30,))
    together = adapter.encode(deep, ids, torch.tensor([0, 10, 30], dtype=torch.int32))
    alone = adapter.encode(deep, ids[10:], torch.tensor([0, 20], dtype=torch.int32))
    for (k, v), (k1, v1) in zip(together, alone):
        torch.testing.assert_close(k[10:], k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[10:], v1, atol=1e-5, rtol=1e-5)


def test_base_encoder_memory_is_the_decoders_own_kv(deep):
    """At initialisation cross layer i's memory of a chunk is decoder layer X[i]'s KV cache of [sink] + chunk
    (sink dropped): values equal, keys rotated so that an unrotated query scores them as a query right
    after the chunk scores the cached keys."""
    from combllama.core.methods.combllama.modules import rope

    c = CombConfig.for_model(deep.config, encoder="base", sink_token=5)
    adapter = CombAdapter.from_base(deep, c)
    assert {n.split(".")[0] for n, _ in adapter.encoder.named_parameters()} == {"proj", "chunk_embed"}
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (30,))
    kv = adapter.encode(deep, ids, torch.tensor([0, 12, 30], dtype=torch.int32))
    chunk = ids[12:]
    with torch.no_grad():
        cache = deep(input_ids=torch.cat([torch.tensor([5]), chunk])[None], use_cache=True).past_key_values
    q = torch.randn(1, 2, 16)
    cos, sin = deep.model.rotary_emb(q[None], torch.tensor([[len(chunk) + 1]]))  # the position after the chunk
    for i, layer in enumerate(c.cross_layers):
        k, v = kv[i][0][12:], kv[i][1][12:]  # [18, Hkv, D]
        cached_k = cache.layers[layer].keys[0, :, 1:].transpose(0, 1)
        cached_v = cache.layers[layer].values[0, :, 1:].transpose(0, 1)
        torch.testing.assert_close(v, cached_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((q * k).sum(-1), (rope(q, cos[0], sin[0]) * cached_k).sum(-1), atol=1e-4, rtol=1e-4)


def test_document_positions_keep_the_distance_of_the_later_chunks(deep):
    """positions="document": a chunk followed by `a` memory tokens has its keys `a` positions further from the
    query than positions="chunk" puts them (q·k as a query `a` tokens later); values and the last chunk are
    unchanged, and "chunk" ignores `after`."""
    from combllama.core.methods.combllama.modules import rope

    chunked = CombAdapter.from_base(deep, CombConfig.for_model(deep.config, encoder="base"))
    documented = CombAdapter.from_base(deep, CombConfig.for_model(deep.config, encoder="base", positions="document"))
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (30,))
    cu, after = torch.tensor([0, 12, 30], dtype=torch.int32), torch.tensor([18, 0])
    per_chunk = chunked.encode(deep, ids, cu, None, after)
    assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(per_chunk, chunked.encode(deep, ids, cu)))
    in_text = documented.encode(deep, ids, cu, None, after)
    q = torch.randn(1, 2, 16)
    cos, sin = deep.model.rotary_emb(q[None], torch.tensor([[18]]))
    for (k, v), (kd, vd) in zip(per_chunk, in_text):
        assert torch.equal(v, vd) and torch.equal(k[12:], kd[12:])
        torch.testing.assert_close((q * kd[:12]).sum(-1), (rope(q, cos[0], sin[0]) * k[:12]).sum(-1),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="positions"):
        CombConfig.for_model(deep.config, positions="sentence")


def test_null_slot_is_one_more_key_with_a_zero_value(deep):
    """With null_slot the cross block's softmax also covers a learned key per KV head whose value is zero:
    attention mass a query puts there is taken away from the memory's values."""
    import torch.nn.functional as F

    c = CombConfig.for_model(deep.config, encoder="base", null_slot=True)
    block = CombAdapter.from_base(deep, c).cross[0]
    torch.manual_seed(4)
    block.null_key.data.normal_()
    block.attn_gate.data.fill_(1.0)
    h = torch.randn(1, 3, 64)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    with torch.no_grad():
        got = block(h, k, v)
        q = block.queries(h)  # [1, 4, 3, 16]
        kk = torch.cat([k, block.null_key[None, :, None]], 2).repeat_interleave(2, 1)
        vv = torch.cat([v, torch.zeros(1, 2, 1, 16)], 2).repeat_interleave(2, 1)
        p = (q @ kk.transpose(-1, -2) / 4).softmax(-1)  # [1, 4, 3, 6]
        a = (p @ vv).transpose(1, 2).reshape(1, 3, 64)
        x = h + torch.tanh(block.attn_gate) * block.o(a)
        want = x + torch.tanh(block.mlp_gate) * block.mlp(block.ln2(x))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert float(p[..., -1].min()) > 0  # the null key takes a share
        masked = block(h, k, v, torch.tensor([[True, True, False, False, False]]))  # a mask still works
    assert masked.shape == got.shape and torch.isfinite(masked).all()


def test_config_refuses_unknown_fields_and_encoders():
    from combllama.core.errors import BadInputError

    c = CombConfig(hidden_size=8, n_heads=2, n_kv_heads=1, head_dim=4, intermediate_size=16, rms_eps=1e-5,
                   n_layers=4, cross_layers=(3,), encoder="base", sink_token=1)
    assert CombConfig.from_json(c.to_json()) == c
    with pytest.raises(BadInputError, match="unknown fields"):
        CombConfig.from_json(c.to_json()[:-1] + ', "future": 1}')
    with pytest.raises(BadInputError, match="encoder"):
        CombConfig(**{**c.__dict__, "encoder": "other"})


def test_packed_attention_is_block_diagonal():
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    out = packed_attention(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 5)
    ref = packed_attention(q[4:], k[4:], v[4:], torch.tensor([0, 5], dtype=torch.int32), 5)
    torch.testing.assert_close(out[4:], ref)


@ENCODERS
def test_chunk_order_signal_changes_the_memory(deep, encoder):
    adapter = CombAdapter.from_base(deep, CombConfig.for_model(deep.config, encoder=encoder))
    adapter.encoder.chunk_embed.data.normal_()
    ids = torch.randint(0, 128, (10,))
    cu = torch.tensor([0, 10], dtype=torch.int32)
    first = adapter.encode(deep, ids, cu, torch.zeros(10, dtype=torch.long))[0][0]
    second = adapter.encode(deep, ids, cu, torch.ones(10, dtype=torch.long))[0][0]
    assert not torch.allclose(first, second)


UNPRUNED = Budget(fraction=1.0)


def _ingest(tiny, doc, store, name, params=None, budget=UNPRUNED, chunk_tokens=128):
    method = get_method("combllama", params, budget)
    result = ingest(tiny, doc, method, store, name=name, config=EncodeConfig(chunk_tokens=chunk_tokens))
    reader = store.open(result.name)
    return reader, from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())


def test_untrained_memory_answers_like_the_bare_prompt(tiny, long_doc, store):
    reader, memory = _ingest(tiny, long_doc, store, "m", {"adapter": "init", "recent": 0})  # all cross memory
    prefix = memory_prefix_ids(tiny.tokenizer)
    assert memory.logical_length == len(prefix) == reader.manifest["prompt"]["prefix_tokens"]
    L, H, D = tiny.kv_shape
    X = len(memory.cross.keys)
    doc_tokens = reader.manifest["source"]["doc_tokens"]
    assert all(k.shape == (1, H, doc_tokens, D) for k in memory.cross.keys)
    assert memory.kv_entries() == L * H * len(prefix) + X * H * doc_tokens
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    answer = list(Engine(tiny.model, memory, tiny.eos_ids).generate(q, GenerateOptions(max_new_tokens=6)))
    # Zero gates: exactly plain inference over the prompt without the document.
    with torch.inference_mode():
        x = torch.tensor([prefix + q])
        plain = []
        for _ in range(len(answer)):
            token = int(tiny.model(input_ids=x).logits[0, -1].argmax())
            plain.append(token)
            x = torch.cat([x, torch.tensor([[token]])], 1)
    assert answer == plain
    # A second answer after trimming sees the same cache.
    again = list(Engine(tiny.model, memory, tiny.eos_ids).generate(q, GenerateOptions(max_new_tokens=6)))
    assert again == answer


def test_gated_memory_reaches_the_logits(tiny, long_doc, store):
    _, memory = _ingest(tiny, long_doc, store, "m", {"adapter": "init"})
    q = turn_ids(tiny.tokenizer, "Which lantern?")
    before = prefill(tiny.model, q, memory.cache, memory.logical_length, memory.lengths[0])
    trim_cache(memory.cache, memory.lengths)
    block = memory.cross.adapter.cross[0]
    try:
        block.attn_gate.data.fill_(1.0)
        after = prefill(tiny.model, q, memory.cache, memory.logical_length, memory.lengths[0])
    finally:
        block.attn_gate.data.zero_()
    assert not torch.allclose(before, after, atol=1e-5)


def test_budget_prunes_each_cross_layer(tiny, long_doc, store):
    reader, full = _ingest(tiny, long_doc, store, "all", {"adapter": "init"})
    _, half = _ingest(tiny, long_doc, store, "half", {"adapter": "init"}, Budget(fraction=0.5))
    kept = half.cross.entries()
    assert kept <= 0.5 * full.cross.entries() + len(reader.manifest["chunks"]) * 2
    assert kept >= 0.4 * full.cross.entries()
    # No --budget: a quarter of the cross memory (the recent tail is never pruned).
    _, default = _ingest(tiny, long_doc, store, "default", {"adapter": "init"}, None)
    assert default.logical_length == full.logical_length
    assert 0.2 * full.cross.entries() <= default.cross.entries() <= 0.25 * full.cross.entries() + len(
        reader.manifest["chunks"]) * 2
    out = list(Engine(tiny.model, half, tiny.eos_ids).generate(turn_ids(tiny.tokenizer, "Which?"),
                                                                GenerateOptions(max_new_tokens=3)))
    assert len(out) <= 3


def _trained_like(model, c=None):
    torch.manual_seed(3)
    adapter = CombAdapter.from_base(model, c or CombConfig.for_model(model.config, rank=4))
    for name, p in adapter.named_parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return adapter


@pytest.mark.parametrize("encoder,null_slot", [("stack", False), ("base", True)])
def test_adapter_file_round_trip(tiny, tmp_path, encoder, null_slot):
    model = tiny.model
    adapter = _trained_like(model, CombConfig.for_model(model.config, rank=4, encoder=encoder, null_slot=null_slot))
    path = tmp_path / "a.safetensors"
    size = save_adapter(path, adapter, base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(model),
                        base_name=tiny.name, info={"steps": 1})
    assert path.stat().st_size == size
    meta = read_header(path)
    assert meta["config"] == adapter.config and meta["info"] == {"steps": 1}
    loaded = load_adapter(path, model)
    for (n, a), (n2, b) in zip(sorted(adapter.state_dict().items()), sorted(loaded.state_dict().items())):
        assert n == n2
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b.float()) if not n.endswith("_gate") else \
            torch.testing.assert_close(a, b)


def test_adapter_refuses_other_model_and_newer_version(tiny, tiny_dir_other, tmp_path):
    from safetensors.torch import load_file, save_file

    from combllama.core.model import ModelSpec, load_model

    path = tmp_path / "a.safetensors"
    save_adapter(path, _trained_like(tiny.model), base_fingerprint=tiny.fingerprint,
                 base_weights=weights_fingerprint(tiny.model), base_name=tiny.name)
    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    with pytest.raises(IncompatibleMemoryError):
        load_adapter(path, other.model)
    meta = read_header(path)
    raw = {k: v for k, v in meta.items() if k not in ("config", "info")}
    raw.update(config=meta["config"].to_json(), info="{}", version="99")
    save_file(load_file(str(path)), str(tmp_path / "new.safetensors"), metadata=raw)
    with pytest.raises(UnsupportedVersionError):
        read_header(tmp_path / "new.safetensors")


def test_default_method_switches_only_for_the_adapters_model(tiny, tiny_dir_other, tmp_path, monkeypatch,
                                                             long_doc, store):
    from combllama.core.model import ModelSpec, load_model

    monkeypatch.setattr(comb_method, "ADAPTERS", tmp_path)
    assert default_method(tiny).name == "full"  # nothing ships yet
    path = tmp_path / "tiny.safetensors"
    save_adapter(path, _trained_like(tiny.model), base_fingerprint=tiny.fingerprint,
                 base_weights=weights_fingerprint(tiny.model), base_name=tiny.name)
    chosen = default_method(tiny)
    assert chosen.name == "combllama" and chosen.options.adapter == "auto"
    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    assert default_method(other).name == "full"
    # "auto" resolves to the shipped adapter: the memory carries its digest.
    comb_method._cache.pop(tiny.model, None)
    reader, memory = _ingest(tiny, long_doc, store, "d", None, chunk_tokens=256)
    assert memory.cross.adapter.config.rank == 4
    # The same memory is refused once "auto" resolves to another adapter.
    path.unlink()
    comb_method._cache.pop(tiny.model, None)
    with pytest.raises(IncompatibleMemoryError):
        from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    comb_method._cache.pop(tiny.model, None)


def test_ingest_gives_each_chunk_the_tokens_after_it(tiny, long_doc, store, tmp_path):
    """Through ingest, a positions="document" adapter keys the last chunk as "chunk" does (nothing after it)
    and every earlier chunk further away."""
    import dataclasses

    model = tiny.model
    adapter = _trained_like(model, CombConfig.for_model(model.config, rank=4, encoder="base"))
    memories = []
    for positions in ("chunk", "document"):
        adapter.config = dataclasses.replace(adapter.config, positions=positions)
        path = tmp_path / f"{positions}.safetensors"
        save_adapter(path, adapter, base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(model),
                     base_name=tiny.name, info={})
        reader, memory = _ingest(tiny, long_doc, store, positions, {"adapter": str(path)})
        memories.append(memory)
    doc_chunks = [c for c in reader.manifest["chunks"] if c["end"] > reader.manifest["prompt"]["prefix_tokens"]]
    last = doc_chunks[-1]["end"] - max(doc_chunks[-1]["start"], reader.manifest["prompt"]["prefix_tokens"])
    assert len(doc_chunks) >= 3
    for k_chunk, k_doc in zip(memories[0].cross.keys, memories[1].cross.keys):
        torch.testing.assert_close(k_doc[:, :, -last:], k_chunk[:, :, -last:])
        assert not torch.allclose(k_doc[:, :, :-last], k_chunk[:, :, :-last], atol=1e-3)


@pytest.mark.parametrize("null_slot,recent", [(False, 0), (True, 0), (True, 100)])
def test_fast_path_reads_the_cross_memory_like_transformers(tiny, long_doc, store, tmp_path, null_slot, recent):
    """core/fast runs the cross blocks through KVMemory.pre_layer: the same logits and greedy answer as
    transformers' forward with the decoder hooks, and the memory visibly changes them."""
    from combllama.core.fast.decode import fast_decoder
    from combllama.core.fast.static_cache import uniform_length

    model = tiny.model
    adapter = _trained_like(model, CombConfig.for_model(model.config, rank=4, encoder="base", null_slot=null_slot))
    for block in adapter.cross:
        block.attn_gate.data.fill_(0.8)
        block.mlp_gate.data.fill_(0.5)
    path = tmp_path / "gated.safetensors"
    save_adapter(path, adapter, base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(model),
                 base_name=tiny.name, info={})
    _, memory = _ingest(tiny, long_doc, store, "fast", {"adapter": str(path), "recent": recent})
    assert memory.pre_layer() is not None and uniform_length(memory) == memory.logical_length
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    pos, phys = memory.logical_length, memory.lengths[0]

    with torch.no_grad():  # not inference_mode: the static buffers made here serve the Engine below
        plain = [prefill(model, q, memory.cache, pos, phys)]
        plain.append(prefill(model, [7], memory.cache, pos + len(q), phys + len(q)))
        trim_cache(memory.cache, memory.lengths)
        dec = fast_decoder(model, memory, len(q) + 4, use_graph=False)
        fast = [dec.prefill(q, pos), dec.step(7, pos + len(q)).clone()]
        dec.static.reset()
        gates = [(b.attn_gate.data.clone(), b.mlp_gate.data.clone()) for b in memory.cross.adapter.cross]
        try:
            for b in memory.cross.adapter.cross:
                b.attn_gate.data.zero_(), b.mlp_gate.data.zero_()
            bare = prefill(model, q, memory.cache, pos, phys)
        finally:
            for b, (ga, gm) in zip(memory.cross.adapter.cross, gates):
                b.attn_gate.data.copy_(ga), b.mlp_gate.data.copy_(gm)
            trim_cache(memory.cache, memory.lengths)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f.float(), p.float(), rtol=1e-4, atol=1e-4)
    assert (fast[0] - bare).abs().max() > 1e-2  # the cross memory is read, not skipped

    opts = GenerateOptions(max_new_tokens=8)
    want = list(Engine(model, memory, [], fast=False).generate(q, opts))
    engine = Engine(model, memory, [], fast=True)
    assert list(engine.generate(q, opts)) == want
    assert engine.stats.extra["path"].startswith("fast")


def test_memory_estimates_follow_the_adapters_cross_layers(tiny, tmp_path):
    """Disk and count estimates use the adapter's cross layers per decoder layer (1/4 when unknown)."""
    model = tiny.model
    path = tmp_path / "every-layer.safetensors"
    save_adapter(path, _trained_like(model, CombConfig.for_model(model.config, rank=4, cross_layers=(0, 1))),
                 base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(model), base_name=tiny.name,
                 info={})
    every = {"adapter": str(path), "recent": 0}
    assert get_method("combllama", every, UNPRUNED).memory_tokens(400) == 400
    assert get_method("combllama", every, Budget(fraction=0.5)).memory_tokens(400) == 200
    assert get_method("combllama", every).memory_tokens(400) == 100  # the default budget: 0.25
    assert get_method("combllama", {"adapter": "init", "recent": 0}, UNPRUNED).memory_tokens(400) == 100
    # The recent tail takes every layer and no budget prunes it: 100 tail + 300 × 1/4.
    assert get_method("combllama", {"adapter": "init", "recent": 100}, Budget(fraction=0.5)).memory_tokens(400) == 137
    assert get_method("combllama", {"adapter": str(tmp_path / "missing")}).cross_share() == 0.25


def test_recent_tail_is_truncates_cache_and_the_rest_is_cross_memory(tiny, long_doc, store):
    """`recent`: the document's last tokens are the KV cache `truncate` keeps (the base model reads them alone,
    after the prefix), the rest cross memory; with zero gates the answer is truncate's exactly."""
    reader, memory = _ingest(tiny, long_doc, store, "tail", {"adapter": "init", "recent": 150})
    _, trunc = _ingest_method(tiny, long_doc, store, "truncate", Budget(tokens=150))
    P = reader.manifest["prompt"]["prefix_tokens"]
    n_doc = reader.manifest["source"]["doc_tokens"]
    assert memory.prefix == P and memory.logical_length == P + 150 == trunc.logical_length
    assert memory.lengths == trunc.lengths
    for a, b in zip(memory.cache.layers, trunc.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    L, H, D = tiny.kv_shape
    X = len(memory.cross.keys)
    assert all(k.shape == (1, H, n_doc - 150, D) for k in memory.cross.keys)
    assert memory.kv_entries() == L * H * (P + 150) + X * H * (n_doc - 150)
    # The tail spans chunks: each stores its own part of it.
    parts = [c["tensors"]["rk"][1][2] for c in reader.manifest["chunks"] if "rk" in c["tensors"]]
    assert len(parts) >= 2 and sum(parts) == 150
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    opts = GenerateOptions(max_new_tokens=6)
    assert list(Engine(tiny.model, memory, tiny.eos_ids).generate(q, opts)) == \
        list(Engine(tiny.model, trunc, tiny.eos_ids).generate(q, opts))


def _ingest_method(tiny, doc, store, name, budget):
    result = ingest(tiny, doc, get_method(name, None, budget), store, name=name, config=EncodeConfig(chunk_tokens=128))
    reader = store.open(result.name)
    return reader, from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())


def test_recent_tail_resumes_mid_tail_like_an_uninterrupted_ingest(tiny, long_doc, store):
    from combllama.core.errors import InterruptedError_

    method = get_method("combllama", {"adapter": "init", "recent": 300})
    config = EncodeConfig(chunk_tokens=128, commit_every=1)
    ingest(tiny, long_doc, method, store, name="whole", config=config)
    n_chunks = len(store.open("whole").manifest["chunks"])
    calls = iter(range(10 ** 6))
    with pytest.raises(InterruptedError_):  # stops with the tail's first chunks committed, its last not
        ingest(tiny, long_doc, method, store, name="cut", config=config,
               should_stop=lambda: next(calls) == n_chunks - 1)
    ingest(tiny, long_doc, method, store, name="cut", config=config, resume=True)
    whole, cut = store.open("whole"), store.open("cut")
    assert any("rk" in t for _, t in cut.chunks())
    for (_, a), (_, b) in zip(whole.chunks(), cut.chunks()):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k])


def test_concat_lays_the_tails_one_after_another(tiny, long_doc, store):
    """Two memories with tails read together: the prefix once, then each tail re-rotated to follow the one
    before it, exactly where one cache holding both tails would put them."""
    from combllama.core.methods.kvcompose import rerotate

    _, a = _ingest(tiny, long_doc, store, "a", {"adapter": "init", "recent": 40})
    _, b = _ingest(tiny, long_doc, store, "b", {"adapter": "init", "recent": 24})
    both = type(a).concat([a, b])
    P = a.prefix
    assert both.logical_length == P + 40 + 24 and both.lengths == [P + 64] * len(both.lengths)
    for lay, la, lb in zip(both.cache.layers, a.cache.layers, b.cache.layers):
        torch.testing.assert_close(lay.keys[:, :, :P + 40], la.keys)
        torch.testing.assert_close(lay.values[:, :, P + 40:], lb.values[:, :, P:])
        torch.testing.assert_close(lay.keys[:, :, P + 40:], rerotate(lb.keys[:, :, P:], 40, a.rotary))
    assert both.cross.keys[0].shape[2] == a.cross.keys[0].shape[2] + b.cross.keys[0].shape[2]
    q = turn_ids(tiny.tokenizer, "Which lantern?")
    assert len(list(Engine(tiny.model, both, tiny.eos_ids).generate(q, GenerateOptions(max_new_tokens=3)))) <= 3


def test_recent_is_validated_and_history_folds_without_it():
    from combllama.core.errors import BadInputError

    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(BadInputError):
            get_method("combllama", {"recent": bad})
    method = get_method("combllama", {"recent": 256}, Budget(fraction=0.5))
    fold = method.folding()
    assert fold.options.recent == 0 and fold.budget == method.budget and fold.options.adapter == method.options.adapter
    plain = get_method("combllama", {"recent": 0}, Budget(fraction=0.5))
    assert plain.folding() is plain
    # With no budget a document keeps a quarter of its cross memory; folded turns stay whole until compaction.
    assert get_method("combllama").folding().budget == Budget(fraction=1.0)
    assert method.memory_tokens(1000) == 256 + int(744 * 0.5 * method.cross_share())
