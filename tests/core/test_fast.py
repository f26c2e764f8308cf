"""core/fast on the CPU: attention backends against fp32 math, the static cache against the
DynamicCache path (same greedy tokens, fp32 logits within 1e-4 on a random Llama and on SmolLM2; in
bf16 no further from fp32 than the plain path), larger later turns, trimming between turns, fallbacks."""
from __future__ import annotations

import copy

import pytest
import torch

from combllama.core.engine import Engine, GenerateOptions
from combllama.core.fast import attention
from combllama.core.fast.decode import FastDecoder, eligible, fast_decoder
from combllama.core.fast.static_cache import StaticKV, uniform_length
from combllama.core.methods.base import KVMemory, make_cache, prefill, trim_cache


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
    return float((a.double() - b.double()).norm() / b.double().norm())


def plain_logits(model, memory: KVMemory, question: list[int], answer: list[int]) -> list:
    """Teacher-forced logits through transformers' forward over the memory's DynamicCache: after the
    question, then after each answer token (the cache is cut back to the memory afterwards)."""
    pos, phys = memory.logical_length, memory.lengths[0]
    out = [prefill(model, question, memory.cache, pos, phys)]
    for i, t in enumerate(answer[:-1]):
        out.append(prefill(model, [t], memory.cache, pos + len(question) + i, phys + len(question) + i))
    trim_cache(memory.cache, memory.lengths)
    return out


def fast_logits(model, memory: KVMemory, question: list[int], answer: list[int]) -> list:
    """The same through core/fast's static cache (no graphs on the CPU)."""
    pos = memory.logical_length
    dec = fast_decoder(model, memory, len(question) + len(answer), use_graph=False)
    out = [dec.prefill(question, pos)]
    for i, t in enumerate(answer[:-1]):
        out.append(dec.step(t, pos + len(question) + i).clone())
    dec.static.reset()
    return out


def greedy(model, memory: KVMemory, question: list[int], n: int, fast: bool) -> list[int]:
    return list(Engine(model, memory, eos_ids=[], fast=fast).generate(question, GenerateOptions(max_new_tokens=n)))


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


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_steps_equal_one_step_at_a_time(model, k):
    """greedy_steps(token, pos, k) (the CUDA graph's body, run eagerly here) feeds each argmax to the next
    step on the device: the same tokens, slots and positions as k calls of step() and argmax."""
    g = torch.Generator().manual_seed(3)
    mem_ids = torch.randint(0, 512, (50,), generator=g).tolist()
    question = torch.randint(0, 512, (7,), generator=g).tolist()
    one = fast_decoder(model, memory_of(model, mem_ids), 32, use_graph=False)
    tok, pos, want = int(one.prefill(question, 50).argmax()), 57, []
    for _ in range(6):
        tok = int(one.step(tok, pos).argmax())
        want.append(tok)
        pos += 1
    burst = fast_decoder(model, memory_of(model, mem_ids), 32, use_graph=False)
    tok, pos, got = int(burst.prefill(question, 50).argmax()), 57, []
    while len(got) < 6:
        got += burst.greedy_steps(tok, pos, k)
        tok, pos = got[-1], pos + k
    assert got[:6] == want
    assert burst.static.used == 7 + len(got) and int(burst.static.used_t) == burst.static.used


def test_two_prefills_and_a_compressed_layout_match_plain(model):
    """The turn part's masked path (a prefill after earlier turn tokens: query i sees slots up to its
    own) and a memory whose logical length exceeds its entries (positions continue from the logical
    length, as after truncate): fp32 logits within 1e-4 of transformers' forward."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (90,), generator=g).tolist()
    q1, q2 = torch.randint(0, 512, (6,), generator=g).tolist(), torch.randint(0, 512, (5,), generator=g).tolist()
    answer = torch.randint(0, 512, (5,), generator=g).tolist()
    cache = make_cache([])
    prefill(model, ids, cache, 400)  # entries at positions 400..489, as if 400 earlier positions were dropped
    memory = KVMemory(cache, 490, [90, 90])
    ref = plain_logits(model, memory, q1 + q2, answer)
    dec = fast_decoder(model, memory, 32, use_graph=False)
    dec.prefill(q1, 490)
    got = [dec.prefill(q2, 496)] + [dec.step(t, 501 + i).clone() for i, t in enumerate(answer[:-1])]
    assert dec.static.used == len(q1) + len(q2) + len(answer) - 1
    for r, f in zip(ref, got):
        assert rel(f, r) < 1e-4


def test_a_larger_later_turn_grows_the_buffer_and_still_matches_plain(model):
    """Regression for the H100 run's 'larger turn' failure: a turn longer than the turn buffer (grown,
    fresh buffers) between two short ones. Every turn's logits match the plain path, and the short turn
    after the long one answers exactly as before it."""
    g = torch.Generator().manual_seed(5)
    memory = memory_of(model, torch.randint(0, 512, (80,), generator=g).tolist())
    short, long = torch.randint(0, 512, (3,), generator=g).tolist(), torch.randint(0, 512, (300,), generator=g).tolist()
    answer = torch.randint(0, 512, (8,), generator=g).tolist()
    first = fast_logits(model, memory, short, answer)
    st = memory.cache._combllama_fast.static
    cap, gen = st.capacity, st.generation
    assert cap < len(long)
    for r, f in zip(plain_logits(model, memory, long, answer), fast_logits(model, memory, long, answer)):
        assert rel(f, r) < 1e-4
    assert st.capacity >= len(long) + len(answer) and st.generation == gen + 1 and st.used == 0
    assert int(st.used_t) == 0
    again = fast_logits(model, memory, short, answer)
    for a, f, r in zip(first, again, plain_logits(model, memory, short, answer)):
        assert rel(f, r) < 1e-4 and rel(a, f) < 1e-6
    # the same through Engine: greedy answers over short, long, short turns equal the plain path's
    for q in (short, long, short):
        assert greedy(model, memory, q, 8, True) == greedy(model, memory, q, 8, False)


def test_out_of_vocabulary_ids_are_refused_before_any_work(model):
    """A token id past the embedding table is a ValueError on the host (on CUDA the lookup would be a
    device-side assert that poisons the process), and the decoder stays usable."""
    memory = memory_of(model, list(range(30)))
    dec = fast_decoder(model, memory, 16, use_graph=False)
    with pytest.raises(ValueError, match="vocabulary"):
        dec.prefill([1, 2, 512], 30)
    assert dec.static.used == 0
    dec.prefill([1, 2], 30)
    with pytest.raises(ValueError, match="vocabulary"):
        dec.step(-1, 32)
    assert dec.static.used == 2 and rel(dec.step(3, 32), plain_logits(model, memory, [1, 2, 3], [0])[0]) < 1e-4


def test_bf16_fast_path_is_as_close_to_fp32_as_plain(model):
    """bf16 rounds differently along the two paths (other kernels, other summation orders), so their
    greedy tokens may part at a near-tie; what must hold is that the fast path's logits are no further
    from the fp32 answer than transformers' own bf16 forward is."""
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    mem_ids = torch.randint(0, 512, (150,), generator=g).tolist()
    q, answer = torch.randint(0, 512, (9,), generator=g).tolist(), torch.randint(0, 512, (8,), generator=g).tolist()
    ref = plain_logits(model, memory_of(model, mem_ids), q, answer)
    plain16 = plain_logits(m16, memory_of(m16, mem_ids), q, answer)
    fast16 = fast_logits(m16, memory_of(m16, mem_ids), q, answer)
    err_plain = sum(rel(p, r) for p, r in zip(plain16, ref)) / len(ref)
    err_fast = sum(rel(f, r) for f, r in zip(fast16, ref)) / len(ref)
    assert 0 < err_plain < 0.05 and err_fast < 1.5 * err_plain


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


@pytest.fixture(scope="module")
def smollm2_prompt(smollm2):
    """The memory prefix and 200 tokens of samples/lighthouse.md, and a question turn."""
    from pathlib import Path

    from combllama import ingest
    from combllama.core.prompt import memory_prefix_ids, turn_ids

    tok = smollm2.tokenizer
    doc = ingest.load(Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md")
    ids = memory_prefix_ids(tok) + tok(doc.joined(), add_special_tokens=False)["input_ids"][:200]
    return ids, turn_ids(tok, "Who kept the lighthouse, and what did they see?")


@pytest.mark.slow
def test_fast_equals_plain_on_smollm2_fp32(smollm2, smollm2_prompt):
    """The real model (9 query heads over 3 KV heads, tied embeddings, its own RoPE base), fp32: the
    plain path's greedy answer, then both paths teacher-forced on it within 1e-4 (one memory serves
    both: the fast path's buffers are the memory's own tensors)."""
    ids, question = smollm2_prompt
    m = smollm2.model
    memory = memory_of(m, ids)
    answer = greedy(m, memory, question, 8, False)
    assert greedy(m, memory, question, 8, True) == answer
    for r, f in zip(plain_logits(m, memory, question, answer), fast_logits(m, memory, question, answer)):
        assert rel(f, r) < 1e-4


@pytest.mark.slow
def test_smollm2_bf16_answers_like_plain(smollm2, smollm2_prompt):
    """bf16 on the CPU: a real model's answer has clear winners, so both paths pick the same tokens, and
    the fast path's logits are no further from fp32 than the plain path's."""
    ids, question = smollm2_prompt
    m16 = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    memory = memory_of(m16, ids)
    answer = greedy(m16, memory, question, 8, False)
    assert greedy(m16, memory, question, 8, True) == answer
    ref = plain_logits(smollm2.model, memory_of(smollm2.model, ids), question, answer)
    err_plain = sum(rel(p, r) for p, r in zip(plain_logits(m16, memory, question, answer), ref)) / len(ref)
    err_fast = sum(rel(f, r) for f, r in zip(fast_logits(m16, memory, question, answer), ref)) / len(ref)
    assert err_fast < 1.5 * err_plain


def test_unified_decode_equals_split_decode(model):
    """The one-kernel decode (memory and turn read together up to a device-side length) against the
    memory kernel + masked turn + merge path, teacher-forced over several steps (fp32 math on the CPU;
    the fused kernel itself is checked the same way in tests/gpu)."""
    mem_ids = list(range(3, 40))
    question, forced = [7, 8, 9, 10], [11, 12, 13, 14, 15]
    outs = []
    for unified in (False, True):
        memory = memory_of(model, mem_ids)
        st = StaticKV.adopt(memory, 16)
        dec = FastDecoder(model, st, use_graph=False, unified=unified)
        got = [dec.prefill(question, len(mem_ids))]
        got += [dec.step(t, len(mem_ids) + len(question) + i).clone() for i, t in enumerate(forced)]
        outs.append(got)
    assert max(rel(a, b) for a, b in zip(*outs)) < 1e-5


def test_prefix_attention_reads_only_the_first_n_entries():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    n = torch.tensor([23], dtype=torch.int32)
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 50], dtype=torch.int32)
    got = attention.attend_prefix(q, k, v, n, cu_q, cu_k, scale=0.25)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 23:], v2[:, :, 23:] = 1e4, float("nan")  # what lies past n must not matter
    assert torch.equal(attention.attend_prefix(q, k2, v2, n, cu_q, cu_k, scale=0.25), got)
    ref = attention.attend(q, k[:, :, :23], v[:, :, :23], scale=0.25, backend="math")[0]
    assert rel(got, ref) < 1e-6


def test_growing_the_turn_slots_keeps_the_memory_and_repoints_the_cache(model):
    memory = memory_of(model, list(range(3, 40)))
    before = [lay.keys.clone() for lay in memory.cache.layers]
    st = StaticKV.adopt(memory, 8)
    assert [lay.keys.data_ptr() for lay in memory.cache.layers] == [b.data_ptr() for b in st.k]
    st.ensure_capacity(64)
    assert st.capacity == 64 and st.generation == 1 and st.used == 0
    for lay, b, old in zip(memory.cache.layers, st.k, before):
        assert lay.keys.data_ptr() == b.data_ptr() and torch.equal(lay.keys, old)  # views of the new buffers
    assert all(float(t.abs().sum()) == 0 for t in st.tail_k)
