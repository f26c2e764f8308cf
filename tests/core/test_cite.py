"""core.cite: the attention shares it computes equal eager attention weights; the cache is left as it
was; ranking rules; core.chat's combination of memories; and citation accuracy on a needle task with
the real SmolLM2."""
from __future__ import annotations

import pytest
import torch

from combllama.core import cite
from combllama.core.chat import Conversation, choose_active, combine, shift_keys
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.methods.base import KVMemory, make_cache, prefill


def _memory(model, ids):
    cache = make_cache([])
    prefill(model, ids, cache, 0, 0)
    n = cache.get_seq_length()
    return KVMemory(cache, len(ids), [n] * len(cache.layers), [(0, n // 2), (n // 2, n)])


@pytest.fixture(scope="module")
def eager(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="eager").eval()


def test_attention_mass_equals_eager_attention_weights(tiny, eager):
    """The hooks' recomputed queries and softmax give exactly what eager attention returns."""
    g = torch.Generator().manual_seed(0)
    mem_ids = torch.randint(100, 5000, (40,), generator=g).tolist()
    prompt = torch.randint(100, 5000, (7,), generator=g).tolist()
    answer = torch.randint(100, 5000, (5,), generator=g).tolist()
    memory = _memory(tiny.model, mem_ids)
    mass = cite.attention_mass(tiny.model, memory, prompt, answer, layers=(0, 1))
    with torch.inference_mode():
        out = eager(input_ids=torch.tensor([mem_ids + prompt + answer[:-1]]), output_attentions=True)
    rows = slice(len(mem_ids) + len(prompt) - 1, None)  # the queries that produced answer tokens
    want = torch.stack([a[0, :, rows, :len(mem_ids)].mean(dim=(0, 1)) for a in out.attentions]).mean(0)
    torch.testing.assert_close(mass, want, rtol=1e-4, atol=1e-6)
    assert 0 < float(mass.sum()) <= 1
    # Scoring the answer in blocks of 2 queries changes nothing.
    torch.testing.assert_close(cite.attention_mass(tiny.model, memory, prompt, answer, (0, 1), block=2), mass)


def test_citation_leaves_the_memory_as_it_was(tiny):
    mem_ids = list(range(300, 360))
    memory = _memory(tiny.model, mem_ids)
    engine = Engine(tiny.model, memory, tiny.eos_ids)
    prompt = list(range(900, 910))
    before = list(engine.generate(prompt, GenerateOptions(8)))
    cite.attention_mass(tiny.model, memory, prompt, before, layers=(1,))
    assert [lay.keys.shape[2] for lay in memory.cache.layers] == memory.lengths
    assert list(engine.generate(prompt, GenerateOptions(8))) == before


def test_span_shares_and_rank():
    mass = torch.tensor([0.5, 0.0, 0.1, 0.1, 0.2, 0.05, 0.05])
    shares = cite.span_shares(mass, [(1, 3), (3, 5), (5, 7)])
    torch.testing.assert_close(shares, torch.tensor([0.2, 0.6, 0.2]))
    assert cite.rank(shares, cite.CiteOptions(min_share=0.25)) == [(1, pytest.approx(0.6))]
    assert [i for i, _ in cite.rank(shares, cite.CiteOptions(min_share=0.1, limit=2))] == [1, 0]
    assert cite.rank(torch.zeros(3)) == []
    with pytest.raises(Exception):
        cite.CiteOptions(min_share=2)


def test_shift_keys_is_encoding_at_a_later_position(tiny):
    """Re-rotating a memory's keys by Δ equals encoding it at positions Δ.. (what combine relies on)."""
    ids = list(range(400, 430))
    at0, at50 = make_cache([]), make_cache([])
    prefill(tiny.model, ids, at0, 0, 0)
    prefill(tiny.model, ids, at50, 50, 0)
    rotary = tiny.model.model.rotary_emb
    for a, b in zip(at0.layers, at50.layers):
        torch.testing.assert_close(shift_keys(a.keys, 50, rotary), b.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)


def test_choose_active_keeps_the_latest_that_fit():
    assert choose_active([100, 200, 300], 2000, 1024) == [0, 1, 2]
    assert choose_active([900, 200, 300], 2000, 1024) == [1, 2]
    assert choose_active([5000], 2000, 1024) == [0]
    assert choose_active([], 2000) == []


def test_combine_two_memories_and_cite_into_the_right_one(tiny):
    a, b = list(range(500, 540)), list(range(700, 760))
    ma, mb = _memory(tiny.model, a), _memory(tiny.model, b)
    man = lambda n, spans: {"prompt": {"prefix_tokens": 4}, "chunks": [  # noqa: E731
        {"seq": i, "start": s, "end": e, "source": [{"path": n, "lines": [i + 1, i + 1]}]}
        for i, (s, e) in enumerate(spans)]}
    att = combine(tiny, [("a", man("a", ma.chunk_spans), ma), ("b", man("b", mb.chunk_spans), mb)])
    assert att.names == ["a", "b"] and att.inactive == []
    assert att.memory.logical_length == 100 and att.memory.lengths == [100, 100]
    assert att.cite_spans == [(4, 20), (20, 40), (44, 70), (70, 100)]  # each memory's 4-token prefix left out
    # The combined cache equals encoding b right after a without b seeing a: compare b's keys.
    alone = make_cache([])
    prefill(tiny.model, b, alone, 40, 0)
    torch.testing.assert_close(att.memory.cache.layers[1].keys[:, :, 40:], alone.layers[1].keys, rtol=1e-4, atol=1e-5)
    conv = Conversation(tiny, att)
    prompt = conv.prompt("hello")
    answer = list(conv.generate(prompt.ids, GenerateOptions(6)))
    cited = conv.cite(prompt.ids, answer)
    assert cited and abs(sum(s for _, s in cite.rank(cite.span_shares(
        cite.attention_mass(tiny.model, att.memory, prompt.ids, answer), att.cite_spans),
        cite.CiteOptions(min_share=0, limit=10))) - 1) < 1e-4
    assert {ref.memory for ref, _ in cited} <= {"a", "b"}


def test_conversation_drops_the_oldest_turns_to_fit(tiny):
    from combllama.core.prompt import Turn

    att = combine(tiny, [])  # no memory: the prompt prefix alone
    conv = Conversation(tiny, att)
    history = [Turn(f"question {i} " + "word " * 300, "answer " * 300) for i in range(60)]
    p = conv.prompt("last question", history, max_new_tokens=64)
    assert p.dropped > 0 and len(p.history) == 60 - p.dropped
    assert p.history[-1] is history[-1]
    assert len(p.ids) + 64 <= conv.room
    assert conv.prompt("q", history[:1]).dropped == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~90 s alone on 2 cores; a shared machine can be 5x slower
def test_needle_citation_accuracy(smollm2, tmp_path):
    """The planted chunk is the first source in >= 90% of the right answers (10 cases, ~1,500 tokens,
    128-token chunks). bench/cite_needle.py runs the same measure over more cases for the record."""
    from combllama.bench.cite_needle import make_cases, run

    result = run(smollm2, make_cases(10), tmp_path / "m")
    assert all(r["chunks"] >= 10 for r in result["rows"])
    assert result["answered_right"] >= 5, result
    assert result["accuracy_among_right"] >= 0.9, result
