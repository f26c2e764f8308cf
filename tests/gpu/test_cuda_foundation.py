"""The foundation on a CUDA device (runs on the GPU machine; skipped elsewhere)."""
from __future__ import annotations

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import CorruptMemoryError
from combllama.core.fast.load import attach_reader
from combllama.core.methods import from_manifest, get_method
from combllama.core.methods.base import prefill
from combllama.core.model import ModelSpec, load_model
from combllama.core.prompt import memory_prefix_ids, turn_ids

pytestmark = pytest.mark.gpu
QUESTION = "Who is the keeper of the lighthouse at Gull Point?"


@pytest.fixture(scope="module")
def cuda_fp32(smollm2):
    return load_model(ModelSpec(device="cuda", dtype="float32"))


@pytest.fixture(scope="module")
def cuda_bf16(smollm2):
    return load_model(ModelSpec(device="cuda"))


def _attach(loaded, store, name):
    reader = store.open(name)
    reader.check_model(loaded.fingerprint)
    return from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())


def test_oracle_on_cuda(cuda_fp32, sample_doc, store):
    loaded = cuda_fp32
    ingest(loaded, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=48))
    memory = _attach(loaded, store, "m")
    doc_ids = loaded.tokenizer(sample_doc.joined(), add_special_tokens=False)["input_ids"]
    ids = memory_prefix_ids(loaded.tokenizer) + doc_ids
    q = turn_ids(loaded.tokenizer, QUESTION)
    with torch.inference_mode():
        ref = loaded.model(torch.tensor([ids + q], device="cuda")).logits[0, -1]
    got = prefill(loaded.model, q, memory.cache, memory.logical_length)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


def test_bf16_answer_and_cpu_written_memory(cuda_bf16, smollm2, sample_doc, store):
    """A memory written on the CPU in float32 serves the same model on the GPU in bfloat16."""
    assert cuda_bf16.fingerprint == smollm2.fingerprint
    ingest(smollm2, sample_doc, get_method("full"), store, name="cpu-made", config=EncodeConfig(chunk_tokens=64))
    memory = _attach(cuda_bf16, store, "cpu-made")
    assert memory.cache.layers[0].keys.device.type == "cuda"
    assert memory.cache.layers[0].keys.dtype == torch.bfloat16
    engine = Engine(cuda_bf16.model, memory, cuda_bf16.eos_ids)
    answer = cuda_bf16.tokenizer.decode(list(engine.generate(turn_ids(cuda_bf16.tokenizer, QUESTION),
                                                             GenerateOptions(max_new_tokens=32))))
    assert "Ada" in answer


def test_attach_reader_answers_like_the_method_attach(cuda_bf16, smollm2, sample_doc, store):
    """What ask and chat use on CUDA: the fast loader (with the kernel warm-up beside it)."""
    ingest(smollm2, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=64))
    fast = attach_reader(store.open("m"), cuda_bf16)
    assert fast.cache._combllama_static is not None
    q = turn_ids(cuda_bf16.tokenizer, QUESTION)
    opts = GenerateOptions(max_new_tokens=32)
    got = list(Engine(cuda_bf16.model, fast, cuda_bf16.eos_ids).generate(q, opts))
    assert got == list(Engine(cuda_bf16.model, _attach(cuda_bf16, store, "m"), cuda_bf16.eos_ids).generate(q, opts))
    assert "Ada" in cuda_bf16.tokenizer.decode(got)


@pytest.mark.parametrize("attach", ["method", "reader"])
def test_nothing_reaches_the_gpu_before_checks_pass(cuda_bf16, smollm2, sample_doc, store, attach):
    ingest(smollm2, sample_doc, get_method("full"), store, name="bad", config=EncodeConfig(chunk_tokens=64))
    reader = store.open("bad")
    last = reader.root / reader.manifest["chunks"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-3] ^= 0x40
    last.write_bytes(bytes(data))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(CorruptMemoryError):
        _attach(cuda_bf16, store, "bad") if attach == "method" else attach_reader(store.open("bad"), cuda_bf16)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # (the reader's kernel warm-up holds only zeros, and frees them)
