"""core/fast's I/O on the CPU: the pipelined writer produces the same bundle as the plain one, surfaces
write errors, and the fast loader gives the same memory (and the same answers) as the method's attach,
refusing a corrupt memory before allocating anything."""
from __future__ import annotations

import pytest
import torch

from combllama.core import encode as encode_mod
from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import CorruptMemoryError
from combllama.core.fast.load import load_memory, loadable
from combllama.core.fast.pipeline import PipelinedWriter
from combllama.core.memory.bundle import MemoryReader
from combllama.core.methods import Budget, from_manifest, get_method
from combllama.core.prompt import turn_ids


def bundle_digest(store, name) -> list:
    reader = MemoryReader(store.path(name))
    return [(c["start"], c["end"], c["sha256"]) for c in reader.manifest["chunks"]]


def test_pipelined_ingest_writes_the_same_bundle(tiny, long_doc, store, monkeypatch):
    cfg = EncodeConfig(chunk_tokens=64, commit_every=2)
    ingest(tiny, long_doc, get_method("full"), store, name="plain", config=cfg)
    made = []
    monkeypatch.setattr(encode_mod, "pipelined", lambda w, device: made.append(PipelinedWriter(w, depth=2)) or made[-1])
    ingest(tiny, long_doc, get_method("full"), store, name="piped", config=cfg)
    assert made and not made[0]._thread.is_alive()
    assert bundle_digest(store, "piped") == bundle_digest(store, "plain")
    assert MemoryReader(store.path("piped")).complete


def test_pipelined_writer_raises_the_thread_error(tiny, long_doc, store, monkeypatch):
    class Boom(Exception):
        pass

    def wrap(w, device):
        real = w.add_chunk

        def add_chunk(*a, **k):
            if w.next_seq == 2:
                raise Boom("disk full")
            return real(*a, **k)

        w.add_chunk = add_chunk
        return PipelinedWriter(w, depth=1)

    monkeypatch.setattr(encode_mod, "pipelined", wrap)
    with pytest.raises(Boom):
        ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=64))
    # what was committed before the failure is a valid partial memory (resumable)
    assert not MemoryReader(store.path("m")).complete


@pytest.mark.parametrize("method,budget", [("full", None), ("truncate", Budget(fraction=0.5))])
def test_fast_loader_equals_attach(tiny, long_doc, store, method, budget):
    ingest(tiny, long_doc, get_method(method, budget=budget), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    assert loadable(reader.manifest)
    ref = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    got = load_memory(reader, tiny.model, capacity=64, workers=3)
    assert got.lengths == ref.lengths and got.logical_length == ref.logical_length
    assert got.chunk_spans == ref.chunk_spans
    for a, b in zip(got.cache.layers, ref.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    opts = GenerateOptions(max_new_tokens=8)
    assert list(Engine(tiny.model, got, tiny.eos_ids, fast=True).generate(q, opts)) == \
        list(Engine(tiny.model, ref, tiny.eos_ids, fast=False).generate(q, opts))


def test_fast_loader_refuses_corruption(tiny, long_doc, store):
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    last = reader.root / reader.manifest["chunks"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-5] ^= 0x10
    last.write_bytes(bytes(data))
    with pytest.raises(CorruptMemoryError):
        load_memory(reader, tiny.model)
