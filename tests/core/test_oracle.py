"""`full` through encode → disk → attach reproduces plain full-context inference (DESIGN.md §7)."""
from __future__ import annotations

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest, plan_memory
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.methods import from_manifest, get_method
from combllama.core.methods.base import prefill, trim_cache
from combllama.core.prompt import turn_ids

QUESTION = "Who is the keeper of the lighthouse at Gull Point?"


def _roundtrip(loaded, doc, store, chunk_tokens):
    result = ingest(loaded, doc, get_method("full"), store, config=EncodeConfig(chunk_tokens=chunk_tokens))
    reader = store.open(result.name)
    reader.check_model(loaded.fingerprint)
    memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
    plan = plan_memory(loaded, doc, get_method("full"), EncodeConfig(chunk_tokens=chunk_tokens))
    return memory, plan.ids


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_full_memory_reproduces_full_context_logits_and_answer(request, which, sample_doc, store):
    loaded = request.getfixturevalue(which)
    memory, memory_ids = _roundtrip(loaded, sample_doc, store, chunk_tokens=48)
    assert memory.logical_length == len(memory_ids)
    q = turn_ids(loaded.tokenizer, QUESTION)
    with torch.inference_mode():
        ref = loaded.model(torch.tensor([memory_ids + q])).logits[0]
    got = prefill(loaded.model, q, memory.cache, memory.logical_length)
    torch.testing.assert_close(got, ref[-1], rtol=1e-4, atol=1e-4)
    trim_cache(memory.cache, memory.lengths)

    # Same greedy answer as plain transformers generate() over the whole context.
    engine = Engine(loaded.model, memory, loaded.eos_ids)
    answer = list(engine.generate(q, GenerateOptions(max_new_tokens=24)))
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([memory_ids + q]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=loaded.eos_ids, pad_token_id=loaded.eos_ids[0])
    expected = [t for t in out[0, len(memory_ids) + len(q):].tolist() if t not in loaded.eos_ids]
    assert answer == expected
    if which == "smollm2":
        assert "Ada" in loaded.tokenizer.decode(answer)


def test_chunking_does_not_change_the_memory(tiny, long_doc, store):
    """Chunk size is an implementation detail of encoding: the KV must not depend on it."""
    a, _ = _roundtrip(tiny, long_doc, store, chunk_tokens=64)
    long_doc.name = "lanterns-2.txt"
    b, _ = _roundtrip(tiny, long_doc, store, chunk_tokens=500)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-5, atol=1e-5)


def test_engine_trims_back_to_the_memory_after_each_answer(tiny, sample_doc, store):
    memory, _ = _roundtrip(tiny, sample_doc, store, chunk_tokens=64)
    engine = Engine(tiny.model, memory, tiny.eos_ids)
    q = turn_ids(tiny.tokenizer, QUESTION)
    first = list(engine.generate(q, GenerateOptions(max_new_tokens=8)))
    assert [lay.keys.shape[-2] for lay in memory.cache.layers] == memory.lengths
    assert list(engine.generate(q, GenerateOptions(max_new_tokens=8))) == first
    # An answer abandoned half way (Ctrl-C) is trimmed too.
    gen = engine.generate(q, GenerateOptions(max_new_tokens=8))
    next(gen)
    gen.close()
    assert [lay.keys.shape[-2] for lay in memory.cache.layers] == memory.lengths
    assert engine.stats.stop == "interrupted"


def test_sampling_is_reproducible_with_a_seed(tiny, sample_doc, store):
    memory, _ = _roundtrip(tiny, sample_doc, store, chunk_tokens=64)
    engine = Engine(tiny.model, memory, tiny.eos_ids)
    q = turn_ids(tiny.tokenizer, "Tell me about the tower.")
    opts = GenerateOptions(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert list(engine.generate(q, opts)) == list(engine.generate(q, opts))
