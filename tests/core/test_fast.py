"""core/fast on the CPU: attention backends against fp32 math, the static cache against the
DynamicCache path (same greedy tokens, close logits), trimming between turns, fallbacks."""
from __future__ import annotations

import pytest
import torch

from combllama.core.engine import Engine, GenerateOptions
from combllama.core.fast import attention
from combllama.core.fast.decode import FastDecoder, eligible, fast_decoder
from combllama.core.fast.static_cache import StaticKV, uniform_length
from combllama.core.methods.base import KVMemory, make_cache, prefill


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_theta=10000.0, attn_implementation="sdpa")
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init: logits with clear winners, real signal
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m


def memory_of(model, ids) -> KVMemory:
    cache = make_cache([])
    prefill(model, ids, cache, 0)
    return KVMemory(cache, len(ids), [len(ids)] * model.config.num_hidden_layers)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_backends_match_math(causal, heads):
    Hq, Hkv = heads
    L = 37
    q = torch.randn(1, Hq, L if causal else 5, 16)
    k, v = torch.randn(1, Hkv, L, 16), torch.randn(1, Hkv, L, 16)
    # fp64 reference through transformers' convention: query head h reads KV head h // G
    G = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * 0.25
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -torch.inf)
    ref = torch.softmax(s, -1) @ v.double().repeat_interleave(G, 1)
    for backend in attention.available("cpu", torch.float32):
        out, lse = attention.attend(q, k, v, scale=0.25, causal=causal, backend=backend)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert rel(out, ref) < 1e-5, backend
        assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-4), backend


def test_merge_of_two_key_sets_is_attention_over_both():
    q = torch.randn(1, 8, 3, 16)
    k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    whole, lse = attention.attend(q, k, v, scale=0.25)
    a = attention.attend(q, k[:, :, :20], v[:, :, :20], scale=0.25)
    b = attention.attend(q, k[:, :, 20:], v[:, :, 20:], scale=0.25)
    out, lse2 = attention.merge(*a, *b)
    assert rel(out, whole) < 1e-5 and torch.allclose(lse, lse2, atol=1e-5)


def test_masked_tail_reads_only_written_slots():
    R, used = 32, 9
    q = torch.randn(1, 8, 3, 16)
    k, v = torch.randn(1, 2, R, 16), torch.randn(1, 2, R, 16)
    k[:, :, used:], v[:, :, used:] = 1e4, -1e4  # stale slots of an earlier turn must get no weight
    out, lse = attention.masked_tail(q, k, v, torch.tensor(used), scale=0.25)
    # query i sees slots < used - 3 + i + 1: the last query everything written, the first two fewer
    for i in range(3):
        n = used - 3 + i + 1
        ref, rl = attention.attend(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n], scale=0.25)
        assert rel(out[:, :, i:i + 1], ref) < 1e-5 and torch.allclose(lse[:, :, i:i + 1], rl, atol=1e-5)


def test_varlen_equals_each_sequence():
    lens = [5, 11, 3]
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    q, k, v = torch.randn(19, 4, 16), torch.randn(19, 2, 16), torch.randn(19, 2, 16)
    out = attention.varlen(q, k, v, cu, cu, max(lens), max(lens), scale=0.25, causal=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref, _ = attention.attend(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                  v[a:b].transpose(0, 1)[None], scale=0.25, causal=True)
        assert rel(out[a:b], ref[0].transpose(0, 1)) < 1e-5


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        attention.choose("cpu", torch.float32, "nope")


def test_static_cache_logits_match_dynamic_cache(model):
    """Teacher-forced: the same tokens through both paths give the same logits at every step."""
    g = torch.Generator().manual_seed(1)
    mem_ids = torch.randint(0, 512, (70,), generator=g).tolist()
    question = torch.randint(0, 512, (9,), generator=g).tolist()
    answer = torch.randint(0, 512, (6,), generator=g).tolist()
    ref_mem, fast_mem = memory_of(model, mem_ids), memory_of(model, mem_ids)
    ref = [prefill(model, question, ref_mem.cache, 70)]
    for i, t in enumerate(answer):
        ref.append(prefill(model, [t], ref_mem.cache, 70 + len(question) + i))
    dec = fast_decoder(model, fast_mem, len(question) + len(answer), use_graph=False)
    got = [dec.prefill(question, 70)]
    for i, t in enumerate(answer):
        got.append(dec.step(t, 70 + len(question) + i).clone())
    for r, f in zip(ref, got):
        assert rel(f, r) < 1e-5


def test_engine_fast_equals_plain_over_turns(model):
    g = torch.Generator().manual_seed(2)
    mem_ids = torch.randint(0, 512, (120,), generator=g).tolist()
    questions = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 15, 4)]
    plain = Engine(model, memory_of(model, mem_ids), eos_ids=[], fast=False)
    memory = memory_of(model, mem_ids)
    fast = Engine(model, memory, eos_ids=[], fast=True)
    opts = GenerateOptions(max_new_tokens=12)
    for q in questions:  # a later turn must not see the earlier one: trimming back to the memory
        a, b = list(plain.generate(q, opts)), list(fast.generate(q, opts))
        assert a == b and len(a) == 12
        assert fast.stats.extra["path"].startswith("fast") and plain.stats.extra["path"] == "plain"
    # the memory's DynamicCache still serves the plain path, unchanged in length and contents
    assert memory.cache.layers[0].keys.shape[2] == 120
    assert list(Engine(model, memory, eos_ids=[], fast=False).generate(questions[0], opts)) == \
        list(plain.generate(questions[0], opts))


def test_engine_stops_early_on_eos_and_resets(model):
    g = torch.Generator().manual_seed(3)
    memory = memory_of(model, torch.randint(0, 512, (40,), generator=g).tolist())
    q = torch.randint(0, 512, (5,), generator=g).tolist()
    first = list(Engine(model, memory, eos_ids=[], fast=True).generate(q, GenerateOptions(max_new_tokens=8)))
    cut = next(i for i, t in enumerate(first) if i and t not in first[:i])  # a token not yet seen
    eng = Engine(model, memory, eos_ids=[first[cut]], fast=True)
    assert list(eng.generate(q, GenerateOptions(max_new_tokens=8))) == first[:cut] and eng.stats.stop == "eos"
    assert memory.cache._combllama_fast.static.used == 0


def test_adopt_shares_storage_and_grows_turn_buffer(model):
    memory = memory_of(model, list(range(30)))
    dec = fast_decoder(model, memory, 8, use_graph=False)
    st = dec.static
    assert st.mem_k[0].data_ptr() == memory.cache.layers[0].keys.data_ptr()
    assert st.capacity >= 8
    gen = st.generation
    again = fast_decoder(model, memory, 4096, use_graph=False)
    assert again is dec and st.capacity == 4096 and st.generation == gen + 1


def test_ragged_or_masked_memories_take_the_plain_path(model):
    memory = memory_of(model, list(range(30)))
    ragged = KVMemory(memory.cache, 30, [30, 20])
    assert uniform_length(ragged) is None
    eng = Engine(model, ragged, eos_ids=[], fast=True)
    list(eng.generate([1, 2, 3], GenerateOptions(max_new_tokens=2)))
    assert eng.stats.extra["path"] == "plain"
    masked = memory_of(model, list(range(30)))
    masked.cache.attention_kwargs = {"combllama_key_masks": [None, None]}
    assert uniform_length(masked) is None


def test_eligibility_and_empty_memory(model):
    assert eligible(model) is None
    st = StaticKV.allocate(2, 2, 16, 0, 32, device="cpu", dtype=torch.float32)
    dec = FastDecoder(model, st, use_graph=False)
    cache = make_cache([])
    ref = prefill(model, [5, 6, 7], cache, 0)
    assert rel(dec.prefill([5, 6, 7], 0), ref) < 1e-5


def test_a_cache_subclass_keeps_its_own_path(model):
    from transformers import DynamicCache

    class Selecting(DynamicCache):  # e.g. an offloading cache that chooses what to read each step
        pass

    memory = memory_of(model, list(range(30)))
    custom = KVMemory(Selecting(ddp_cache_data=[(l.keys, l.values) for l in memory.cache.layers]), 30, [30, 30])
    assert uniform_length(memory) == 30 and uniform_length(custom) is None
