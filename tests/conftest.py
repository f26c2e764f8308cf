"""Shared fixtures: every test gets its own COMBLLAMA_HOME; models are tiny, random and on CPU,
plus the real embedded SmolLM2 (converted once per test run into a shared cache dir)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One converted-model cache for the whole run: the GGUF is dequantized once, not per test."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, shared_cache):
    """Nothing a test does may touch the real user directories."""
    home = tmp_path / "home"
    monkeypatch.setenv("COMBLLAMA_HOME", str(home))
    monkeypatch.setenv("COMBLLAMA_CACHE_DIR", str(shared_cache))
    monkeypatch.delenv("COMBLLAMA_MEMORY_DIR", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return home


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; runs on the GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


LONG_TEXT = "\n".join(
    f"Line {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} lantern number {i * 7} hangs in room {i % 13} "
    f"of the {['north', 'south', 'east'][i % 3]} wing." for i in range(1, 400))


@pytest.fixture(scope="session")
def smollm2(shared_cache):
    """The real embedded model (converted from its GGUF once per run), float32 on CPU."""
    from combllama.core.model import ModelSpec, load_model
    from combllama.core.paths import Paths

    return load_model(ModelSpec(device="cpu"), Paths.from_env({"COMBLLAMA_HOME": str(shared_cache / "h"),
                                                               "COMBLLAMA_CACHE_DIR": str(shared_cache)}))


def _tiny_dir(root, smollm2, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=32768, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=smollm2.tokenizer.bos_token_id, eos_token_id=smollm2.tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    d = root / f"tiny-llama-{seed}"
    model.save_pretrained(str(d))
    smollm2.tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a local HF directory (--model PATH)."""
    return _tiny_dir(tmp_path_factory.mktemp("models"), smollm2, 0)


@pytest.fixture(scope="session")
def tiny_dir_other(tmp_path_factory, smollm2):
    """Same shapes and tokenizer as tiny_dir, other weights: a memory of one must be refused by the other."""
    return _tiny_dir(tmp_path_factory.mktemp("models-b"), smollm2, 1)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from combllama.core.model import ModelSpec, load_model

    return load_model(ModelSpec(str(tiny_dir), device="cpu"))


@pytest.fixture
def store(isolated_home):
    from combllama.core.memory.store import MemoryStore

    return MemoryStore(isolated_home / "memories")


@pytest.fixture
def long_doc():
    from combllama.ingest import Document, Origin, Section

    return Document("lanterns.txt", "text", [Section(LONG_TEXT, Origin("lanterns.txt", 1))], "0" * 64)


@pytest.fixture
def sample_doc():
    from pathlib import Path

    from combllama import ingest

    return ingest.load(Path(__file__).resolve().parents[1] / "samples" / "lighthouse.md")
