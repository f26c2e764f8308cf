"""core/fast's I/O on the CPU: the pipelined writer produces the same bundle as the plain one, surfaces
write errors, and the fast loader gives the same memory (and the same answers) as the method's attach,
refusing a corrupt memory before allocating anything."""
from __future__ import annotations

import time

import pytest
import torch

from combllama.core import encode as encode_mod
from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import CorruptMemoryError, IncompatibleMemoryError
from combllama.core.fast.load import attach_reader, load_memory, loadable
from combllama.core.fast.pipeline import PipelinedWriter
from combllama.core.memory.bundle import MemoryReader
from combllama.core.methods import Budget, from_manifest, get_method
from combllama.core.model import ModelSpec, load_model
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


@pytest.mark.parametrize("method,budget,piece", [("full", None, None), ("truncate", Budget(fraction=0.5), None),
                                                 ("full", None, 1)])
def test_fast_loader_equals_attach(tiny, long_doc, store, method, budget, piece, monkeypatch):
    """piece: PIECE_BYTES (1: every layer of K and V moves through the host pieces as its own block)."""
    if piece:
        monkeypatch.setattr("combllama.core.fast.load.PIECE_BYTES", piece)
    ingest(tiny, long_doc, get_method(method, budget=budget), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    assert loadable(reader.manifest)
    ref = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    timings: dict = {}
    got = load_memory(reader, tiny.model, capacity=64, workers=3, timings=timings)
    assert timings["verify_s"] > 0 and timings["bytes"] == sum(c["bytes"] for c in reader.manifest["chunks"])
    assert got.lengths == ref.lengths and got.logical_length == ref.logical_length
    assert got.chunk_spans == ref.chunk_spans
    for a, b in zip(got.cache.layers, ref.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    opts = GenerateOptions(max_new_tokens=8)
    assert list(Engine(tiny.model, got, tiny.eos_ids, fast=True).generate(q, opts)) == \
        list(Engine(tiny.model, ref, tiny.eos_ids, fast=False).generate(q, opts))


def test_attach_reader_takes_the_fast_loader_where_it_applies(tiny, tiny_dir_other, long_doc, store):
    """What ask and chat call: the fast loader on CUDA (forced here), the method's attach elsewhere; the
    same answer either way, and another model's memory refused before anything is read."""
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    plain, fast = attach_reader(reader, tiny), attach_reader(reader, tiny, fast=True)
    assert getattr(plain.cache, "_combllama_static", None) is None and fast.cache._combllama_static is not None
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    opts = GenerateOptions(max_new_tokens=8)
    assert list(Engine(tiny.model, fast, tiny.eos_ids).generate(q, opts)) == \
        list(Engine(tiny.model, plain, tiny.eos_ids, fast=False).generate(q, opts))
    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    with pytest.raises(IncompatibleMemoryError):
        attach_reader(reader, other, fast=True)


def test_fast_loader_refuses_corruption(tiny, long_doc, store):
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    last = reader.root / reader.manifest["chunks"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-5] ^= 0x10
    last.write_bytes(bytes(data))
    with pytest.raises(CorruptMemoryError):
        load_memory(reader, tiny.model)


def test_chunks_read_into_a_supplied_buffer_equal_the_default_read(tiny, long_doc, store):
    """The path the GPU loader takes with page-locked buffers: same tensors, views of the one buffer."""
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    buffers = []
    alloc = lambda n: buffers.append(torch.empty(n, dtype=torch.uint8)) or buffers[-1]  # noqa: E731
    for record in reader.manifest["chunks"]:
        plain, supplied = reader.chunk(record), reader.chunk(record, alloc)
        assert plain.keys() == supplied.keys()
        for name in plain:
            assert torch.equal(plain[name], supplied[name])
            assert supplied[name].untyped_storage().data_ptr() == buffers[-1].untyped_storage().data_ptr()


def _rewrite_chunk(reader, seq: int, mutate, spec: bool = False) -> None:
    """Replace chunk `seq` by a correctly hashed file whose tensors `mutate` changed (the manifest's file,
    checksum and size follow; its tensor shapes too when `spec`)."""
    import hashlib
    import json

    from safetensors.torch import save

    from combllama.core.memory.format import seal_manifest

    rec = reader.manifest["chunks"][seq]
    tensors = {k: v.clone() for k, v in reader.chunk(rec).items()}
    mutate(tensors)
    data = save(tensors)
    sha = hashlib.sha256(data).hexdigest()
    new_file = f"chunks/{seq:06d}-{sha[:12]}.safetensors"
    (reader.root / new_file).write_bytes(data)
    m = json.loads((reader.root / "MANIFEST.json").read_text())
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    m["chunks"][seq].update(file=new_file, sha256=sha, bytes=len(data))
    if spec:
        m["chunks"][seq]["tensors"] = {k: [codes[v.dtype], list(v.shape)] for k, v in tensors.items()}
    (reader.root / "MANIFEST.json").write_bytes(seal_manifest(m))


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "shape"])
def test_streamed_check_refuses_what_chunk_refuses(tiny, long_doc, store, damage):
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    for rec in reader.manifest["chunks"]:
        reader.check_chunk(rec)  # intact: passes
    if damage == "shape":
        _rewrite_chunk(reader, 1, lambda t: t.update(k=t["k"][:, :, :-1].contiguous()))
        reader = store.open("m")
    else:
        path = reader.root / reader.manifest["chunks"][1]["file"]
        data = bytearray(path.read_bytes())
        if damage == "bitflip":
            data[len(data) // 2] ^= 0x01
        else:
            del data[-100:]
        path.write_bytes(bytes(data))
    rec = reader.manifest["chunks"][1]
    with pytest.raises(CorruptMemoryError) as a:
        reader.chunk(rec)
    with pytest.raises(CorruptMemoryError) as b:
        reader.check_chunk(rec)
    assert str(a.value) == str(b.value)
    with pytest.raises(CorruptMemoryError):
        load_memory(reader, tiny.model)


def test_a_file_changed_between_the_passes_and_nan_values_are_refused(tiny, long_doc, store, monkeypatch):
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    last = reader.manifest["chunks"][-1]
    path = reader.root / last["file"]
    check = reader.check_chunk

    def check_then_change(record):  # pass 1 hashes the intact file, then it changes before pass 2
        identity = check(record)
        if record is last:
            time.sleep(0.05)  # file timestamps move in clock ticks (ms): a change must land in a later one
            data = bytearray(path.read_bytes())
            data[-5] ^= 0x10
            path.write_bytes(bytes(data))
        return identity

    monkeypatch.setattr(reader, "check_chunk", check_then_change)
    with pytest.raises(CorruptMemoryError, match="checksum"):
        load_memory(reader, tiny.model, ring=2, workers=1)
    monkeypatch.undo()

    ingest(tiny, long_doc, get_method("full"), store, name="n", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("n")
    _rewrite_chunk(reader, 2, lambda t: t["v"].view(-1)[7:8].fill_(float("inf")))
    with pytest.raises(CorruptMemoryError, match="NaN or Inf"):
        load_memory(store.open("n"), tiny.model, ring=2)


def test_the_transfer_pass_skips_the_hash_only_for_files_unchanged_since_checked(tiny, long_doc, store, monkeypatch):
    import combllama.core.memory.bundle as bundle

    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    reader = store.open("m")
    hashed = []
    real = bundle.hashlib.sha256
    monkeypatch.setattr(bundle.hashlib, "sha256", lambda *a: hashed.append(len(a[0]) if a else 0) or real(*a))
    rec = reader.manifest["chunks"][0]
    identity = reader.check_chunk(rec)
    n = len(hashed)
    assert torch.equal(reader.chunk(rec, known=identity)["k"], reader.chunk(rec)["k"])
    assert len(hashed) == n + 1  # chunk(known=...) hashed nothing; the plain chunk() hashed once
    path = reader.root / rec["file"]
    time.sleep(0.05)
    path.write_bytes(path.read_bytes())  # same bytes, new mtime/ctime: hashed again (and still valid)
    reader.chunk(rec, known=identity)
    assert len(hashed) == n + 2


def test_blocks_that_do_not_fit_the_model_are_a_corrupt_memory(tiny, long_doc, store):
    """Reliability case 8 for the fast loader: a re-sealed chunk with one head too few (valid checksums)."""
    ingest(tiny, long_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=96))
    _rewrite_chunk(store.open("m"), 1, lambda t: t.update(k=t["k"][:, :1].contiguous(), v=t["v"][:, :1].contiguous()),
                   spec=True)
    with pytest.raises(CorruptMemoryError, match="chunk 1: K/V shapes .* do not fit the model"):
        load_memory(store.open("m"), tiny.model)
