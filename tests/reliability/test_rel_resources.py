"""Resource limits: an out-of-memory error at step k of an ingest or of an answer becomes a
ResourceError (exit 4) that says what to change, nothing half-computed is committed and the process
stays usable; a memory too large for the device is refused from its manifest before any load."""
from __future__ import annotations

import weakref

import pytest
import torch
from click.testing import CliRunner

from combllama.cli.main import cli
from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import ResourceError
from combllama.core.memory.plan import check_attach, plan_attach
from combllama.core.methods import from_manifest, get_method
from combllama.core.prompt import turn_ids

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


class FailAt:
    """A model forward that raises torch.cuda.OutOfMemoryError on its k-th call (1-based)."""

    def __init__(self, forward, k: int):
        self.forward, self.k, self.calls = forward, k, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise torch.cuda.OutOfMemoryError(OOM)
        return self.forward(*args, **kwargs)


@pytest.mark.parametrize("k", [1, 4])
def test_oom_during_ingest_keeps_committed_chunks_and_resumes(tiny, sample_doc, store, monkeypatch, k):
    config = EncodeConfig(chunk_tokens=64, commit_every=1)
    monkeypatch.setattr(tiny.model, "forward", FailAt(tiny.model.forward, k))
    with pytest.raises(ResourceError) as err:
        ingest(tiny, sample_doc, get_method("full"), store, name="m", config=config)
    message = str(err.value)
    assert "out of memory" in message and "\n" not in message
    for hint in ("--chunk-tokens", "--budget", "--method", "--resume"):
        assert hint in message
    reader = store.open("m")
    assert reader.manifest["ingest"]["next_seq"] == k - 1  # the chunk that failed was not committed
    assert reader.verify() == []
    monkeypatch.undo()
    done = ingest(tiny, sample_doc, get_method("full"), store, name="m", config=config, resume=True)
    ref = ingest(tiny, sample_doc, get_method("full"), store, name="ref", config=config)
    assert done.resumed == (k > 1) and done.stats["chunks"] == ref.stats["chunks"]
    assert [c["sha256"] for c in store.open("m").manifest["chunks"]] == \
        [c["sha256"] for c in store.open("ref").manifest["chunks"]]


def test_cli_ingest_oom_exits_4_with_one_line(tiny_dir, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    doc = tmp_path / "doc.md"
    doc.write_text("The keeper lit the lamp at dusk. " * 200)
    fail = FailAt(LlamaForCausalLM.forward, 2)
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda self, *a, **k: fail(self, *a, **k))
    result = CliRunner().invoke(cli, ["ingest", str(doc), "--model", str(tiny_dir), "--device", "cpu",
                                      "--chunk-tokens", "64", "-q"])
    assert result.exit_code == 4, result.output
    assert "out of memory" in result.output and len(result.output.strip().splitlines()) == 1


class Tracked:
    """A model forward that keeps weak references to the logits of each call, and on its k-th call allocates a
    scratch tensor (the failed step's own memory) and raises OutOfMemoryError while holding it."""

    def __init__(self, forward, k: int, scratch_bytes: int = 1 << 20, device: str = "cpu"):
        self.forward, self.k, self.calls, self.refs = forward, k, 0, []
        self.scratch_bytes, self.device = scratch_bytes, device

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=self.device)
            self.refs.append(("scratch of the failed call", weakref.ref(scratch)))
            raise torch.cuda.OutOfMemoryError(OOM)
        out = self.forward(*args, **kwargs)
        self.refs.append((f"logits of call {self.calls}", weakref.ref(out.logits)))
        return out

    def alive(self) -> list[str]:
        return [name for name, ref in self.refs if ref() is not None]


def test_oom_during_ingest_drops_every_reference_to_the_work_in_flight(tiny, sample_doc, store, monkeypatch):
    """Case 30 (CPU): once the ResourceError is raised, while it is still being handled (its traceback holds
    ingest's frame), nothing of the failed step is referenced: not its scratch tensor, not any step's logits,
    not the encoder nor its KV cache of the chunks before (a GPU would get all of it back)."""
    method = get_method("full")
    made = {}
    real_encoder = method.encoder

    def encoder(model, total_tokens, reserve=0):
        enc = real_encoder(model, total_tokens, reserve)
        made["encoder"], made["its cache"] = weakref.ref(enc), weakref.ref(enc.cache)
        return enc

    monkeypatch.setattr(method, "encoder", encoder)
    tracked = Tracked(tiny.model.forward, 3)
    monkeypatch.setattr(tiny.model, "forward", tracked)
    try:
        ingest(tiny, sample_doc, method, store, name="m", config=EncodeConfig(chunk_tokens=64, commit_every=1))
    except ResourceError:
        assert tracked.calls == 3 and len(tracked.refs) == 3
        assert tracked.alive() == []
        assert [name for name, ref in made.items() if ref() is not None] == []
    else:
        pytest.fail("no ResourceError")
    assert store.open("m").manifest["ingest"]["next_seq"] == 2


def test_oom_while_answering_drops_every_reference_to_the_failed_step(tiny, attached, monkeypatch):
    """Case 30 (CPU), answering: after the error nothing of the failed step or of earlier steps' logits is
    referenced, and the cache is cut back to the memory's length. (Cut by slicing: the plain path's cache
    keeps the last answer's slack as the base of its views until the next answer, failed or not; the
    GPU fast path uses fixed buffers: tests/gpu/test_oom_gpu.py.)"""
    _, memory = attached
    ids = turn_ids(tiny.tokenizer, "Who keeps the lighthouse?")
    engine = Engine(tiny.model, memory, tiny.eos_ids, fast=False)
    lengths = list(memory.lengths)
    tracked = Tracked(tiny.model.forward, 4)
    monkeypatch.setattr(tiny.model, "forward", tracked)
    try:
        list(engine.generate(ids, GenerateOptions(max_new_tokens=8)))
    except ResourceError:
        assert tracked.calls == 4 and tracked.alive() == []
        assert [lay.keys.shape[2] for lay in memory.cache.layers] == lengths
    else:
        pytest.fail("no ResourceError")


@pytest.fixture
def attached(tiny, sample_doc, store):
    ingest(tiny, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=128))
    reader = store.open("m")
    return reader, from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())


@pytest.mark.parametrize("k", [1, 3])
def test_oom_while_answering_leaves_the_engine_usable(tiny, attached, monkeypatch, k):
    _, memory = attached
    ids = turn_ids(tiny.tokenizer, "Who keeps the lighthouse?")
    options = GenerateOptions(max_new_tokens=8)
    engine = Engine(tiny.model, memory, tiny.eos_ids, fast=False)
    expected = list(engine.generate(ids, options))
    lengths = list(memory.lengths)
    monkeypatch.setattr(tiny.model, "forward", FailAt(tiny.model.forward, k))
    got = []
    with pytest.raises(ResourceError) as err:
        for token in engine.generate(ids, options):
            got.append(token)
    assert got == expected[:k - 1]  # tokens streamed before the failure were right
    assert "out of memory answering" in str(err.value) and "--max-tokens" in str(err.value)
    assert engine.stats.stop == "out-of-memory"
    assert [lay.keys.shape[2] for lay in memory.cache.layers] == lengths  # trimmed back to the memory
    monkeypatch.undo()
    assert list(engine.generate(ids, options)) == expected  # the same engine answers again, identically


def test_non_oom_errors_are_not_swallowed(tiny, attached, monkeypatch):
    _, memory = attached

    def broken(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tiny.model, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(Engine(tiny.model, memory, tiny.eos_ids, fast=False).generate([1, 2, 3]))


def test_plan_attach_counts_every_tensor_byte(attached):
    reader, memory = attached
    plan = plan_attach(reader.manifest, 1 << 40)
    actual = sum(t.numel() * t.element_size() for _, ts in reader.chunks() for t in ts.values())
    assert plan.tensor_bytes == actual
    m = reader.manifest["model"]
    assert plan.working_bytes == 1024 * m["n_layers"] * 2 * m["n_kv_heads"] * m["head_dim"] * 4
    assert plan_attach(reader.manifest, 1 << 40, dtype_bytes=2).tensor_bytes == actual // 2  # fp32 → bf16


def test_memory_larger_than_the_device_is_refused_before_loading(attached, monkeypatch):
    import combllama.core.memory.bundle as bundle

    reader, _ = attached
    reads = []
    monkeypatch.setattr(bundle, "_load_verified", lambda *a, **k: reads.append(a) or {})
    need = plan_attach(reader.manifest, 0).need_bytes
    with pytest.raises(ResourceError, match="needs .* GiB on cuda") as err:
        check_attach(reader.manifest, need - 1)
    assert "--budget" in str(err.value) and "--device cpu" in str(err.value)
    assert check_attach(reader.manifest, need).fits
    assert reads == []  # planned from the manifest alone


@pytest.mark.gpu
def test_plan_matches_cuda_allocation(tiny_dir, sample_doc, store):
    from combllama.core.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(tiny_dir), device="cuda", dtype="bfloat16"))
    ingest(loaded, sample_doc, get_method("full"), store, name="g", config=EncodeConfig(chunk_tokens=128))
    reader = store.open("g")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    plan = check_attach(reader.manifest, torch.cuda.mem_get_info()[0], dtype_bytes=2)
    memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert plan.tensor_bytes <= grown <= plan.tensor_bytes * 1.1 + (1 << 20), (plan.tensor_bytes, grown)
    del memory
