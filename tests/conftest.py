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
