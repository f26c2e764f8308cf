"""The contract every registered method must honour (kvpress's default_presses idea): adding a
method to METHODS adds it to every test here."""
from __future__ import annotations

import json

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.methods import METHODS, Budget, KVMemory, from_manifest, get_method
from combllama.core.prompt import turn_ids

NAMES = sorted(METHODS)


def _budget_for(name):
    return None if name == "full" else Budget(fraction=0.5)


def _build(tiny, doc, store, name, mem_name=None):
    method = get_method(name, None, _budget_for(name))
    result = ingest(tiny, doc, method, store, name=mem_name or name, config=EncodeConfig(chunk_tokens=128))
    reader = store.open(result.name)
    memory = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    return result, reader, memory


@pytest.mark.parametrize("name", NAMES)
def test_options_are_typed_and_round_trip(name):
    cls = METHODS[name]
    assert cls.name == name and isinstance(cls.summary, str) and cls.summary
    method = get_method(name, None, _budget_for(name))
    params = json.loads(json.dumps(method.params()))
    budget = params.pop("budget")
    again = get_method(name, params, Budget(**budget) if budget else None)
    assert again.params() == method.params()
    with pytest.raises(Exception):
        get_method(name, {"no_such_option": 1})


@pytest.mark.parametrize("name", NAMES)
def test_encode_disk_attach_generate(name, tiny, long_doc, store):
    result, reader, memory = _build(tiny, long_doc, store, name)
    assert reader.complete and reader.verify() == []
    assert isinstance(memory, KVMemory)
    L, H, D = tiny.kv_shape
    assert len(memory.cache.layers) == L
    for lay, n in zip(memory.cache.layers, memory.lengths):
        assert lay.keys.shape[0] == 1 and lay.keys.shape[1] == H and lay.keys.shape[-1] == D
        assert lay.keys.shape[-2] == n and lay.values.shape == lay.keys.shape
        assert torch.isfinite(lay.keys).all() and torch.isfinite(lay.values).all()
    # Positions never go past the window; the memory never holds more entries than positions.
    assert max(memory.lengths) <= memory.logical_length <= tiny.window
    engine = Engine(tiny.model, memory, tiny.eos_ids)
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    out = list(engine.generate(q, GenerateOptions(max_new_tokens=5)))
    assert 1 <= len(out) <= 5 or engine.stats.stop == "eos"
    assert [lay.keys.shape[-2] for lay in memory.cache.layers] == memory.lengths


@pytest.mark.parametrize("name", NAMES)
def test_budget_is_honoured(name, tiny, long_doc, store):
    _, reader, memory = _build(tiny, long_doc, store, name)
    doc_tokens = reader.manifest["source"]["doc_tokens"]
    prefix = reader.manifest["prompt"]["prefix_tokens"]
    kept = sum(memory.lengths) / len(memory.lengths)
    if _budget_for(name) is not None:
        assert kept <= 0.5 * doc_tokens + prefix + 1
    else:
        assert kept == doc_tokens + prefix


@pytest.mark.parametrize("name", NAMES)
def test_encoding_is_deterministic(name, tiny, long_doc, store):
    _, a, _ = _build(tiny, long_doc, store, name, "first")
    _, b, _ = _build(tiny, long_doc, store, name, "second")
    for (ra, ta), (rb, tb) in zip(a.chunks(), b.chunks()):
        assert ra["sha256"] == rb["sha256"]
        assert ta.keys() == tb.keys()
