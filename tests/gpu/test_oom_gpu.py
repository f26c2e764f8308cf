"""Reliability case 30 on a real GPU (runs on the GPU machine; skipped elsewhere): an out-of-memory error
raised by CUDA's caching allocator itself, under torch.cuda.set_per_process_memory_fraction, in the middle
of an ingest and of an answer. Afterwards — with the error still alive, as in a handler — the device memory
in use (torch.cuda.memory_allocated) is back to what it was before, nothing of the failed step is kept, and
the work can go on (resume, the next answer).

The CPU versions (an injected error, weak references): tests/reliability/test_rel_resources.py."""
from __future__ import annotations

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import ResourceError
from combllama.core.methods import from_manifest, get_method
from combllama.core.prompt import turn_ids

pytestmark = pytest.mark.gpu
MiB = 1 << 20
HELD = 256 * MiB  # what the failing step holds when it runs out: it must all come back


@pytest.fixture
def gpu(tiny_dir):
    from combllama.core.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(tiny_dir), device="cuda", dtype="bfloat16"))
    yield loaded
    torch.cuda.set_per_process_memory_fraction(1.0)  # also when a test failed under its cap
    torch.cuda.empty_cache()


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _cap(extra: int) -> int:
    """Let this process reserve at most what it has reserved now plus `extra` bytes; returns that limit."""
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(0).total_memory
    limit = torch.cuda.memory_reserved() + extra
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
    return limit


class RealOOM:
    """A module forward whose k-th call takes HELD bytes of device memory, then asks for twice the process's
    limit: the allocator raises torch.OutOfMemoryError (nothing here raises it) while HELD is in use."""

    def __init__(self, forward, k: int, limit: int):
        self.forward, self.k, self.limit, self.calls = forward, k, limit, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            held = torch.empty(HELD, dtype=torch.uint8, device="cuda")
            held.fill_(1)
            torch.empty(2 * self.limit, dtype=torch.uint8, device="cuda")  # raises
        return self.forward(*args, **kwargs)


def test_real_oom_during_ingest_gives_the_device_memory_back(gpu, sample_doc, store, monkeypatch):
    config = EncodeConfig(chunk_tokens=64, commit_every=1)
    ingest(gpu, sample_doc, get_method("full"), store, name="warm", config=config)  # kernels, workspaces
    base = _allocated()
    limit = _cap(HELD + 256 * MiB)
    fail = RealOOM(gpu.model.forward, 3, limit)
    monkeypatch.setattr(gpu.model, "forward", fail)
    with pytest.raises(ResourceError, match="out of GPU memory encoding chunk 3/") as err:
        ingest(gpu, sample_doc, get_method("full"), store, name="m", config=config)
    assert fail.calls == 3 and isinstance(err.value, ResourceError)
    # `err` keeps the error and its traceback (ingest's frame) alive: the device memory is back all the same.
    assert _allocated() <= base + MiB, (base, _allocated())
    torch.cuda.set_per_process_memory_fraction(1.0)
    monkeypatch.undo()
    done = ingest(gpu, sample_doc, get_method("full"), store, name="m", config=config, resume=True)
    assert done.resumed and store.open("m").complete and store.open("m").verify() == []


@pytest.mark.parametrize("fast, k", [(False, 1), (False, 3), (None, 1)], ids=["plain-prefill", "plain-decode",
                                                                            "fast-prefill"])
def test_real_oom_while_answering_gives_the_device_memory_back(gpu, sample_doc, store, monkeypatch, fast, k):
    """The k-th call of the last layer's MLP runs out (both answering paths call it; the fast path's decode
    steps replay a CUDA graph, so it is failed in its prefill). The baseline is taken after one whole answer,
    so it holds what answering keeps between questions (the fast path's buffers, the plain path's slack)."""
    ingest(gpu, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=128))
    reader = store.open("m")
    memory = from_manifest(reader.manifest).attach(gpu.model, reader.manifest, reader.chunks())
    engine = Engine(gpu.model, memory, gpu.eos_ids, fast=fast)
    ids = turn_ids(gpu.tokenizer, "Who keeps the lighthouse?")
    options = GenerateOptions(max_new_tokens=8)
    expected = list(engine.generate(ids, options))
    lengths = list(memory.lengths)
    base = _allocated()
    mlp = gpu.model.model.layers[-1].mlp
    fail = RealOOM(mlp.forward, k, _cap(HELD + 256 * MiB))
    monkeypatch.setattr(mlp, "forward", fail)
    with pytest.raises(ResourceError, match="out of GPU memory answering"):
        list(engine.generate(ids, options))
    assert fail.calls == k and engine.stats.stop == "out-of-memory"
    assert _allocated() <= base + MiB, (base, _allocated())
    assert [lay.keys.shape[2] for lay in memory.cache.layers] == lengths
    torch.cuda.set_per_process_memory_fraction(1.0)
    monkeypatch.undo()
    assert list(engine.generate(ids, options)) == expected  # the same engine answers again, identically
