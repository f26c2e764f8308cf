"""Every way a memory can be wrong ends in one typed error (and, through the CLI, one line and its
own exit code) before anything reaches a device."""
from __future__ import annotations

import json
import pickle

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli
from combllama.core.encode import EncodeConfig, ingest
from combllama.core.errors import (CorruptMemoryError, IncompatibleMemoryError, NotAMemoryError,
                                   UnsupportedVersionError)
from combllama.core.memory.format import canonical_json, seal_manifest
from combllama.core.methods import get_method


@pytest.fixture
def memory(tiny, sample_doc, store):
    result = ingest(tiny, sample_doc, get_method("full"), store, config=EncodeConfig(chunk_tokens=64))
    return store.open(result.name)


def _first_chunk(memory):
    return memory.root / memory.manifest["chunks"][0]["file"]


def _load_all(store, memory, fingerprint):
    reader = store.open(memory.root.name)
    reader.check_model(fingerprint)
    list(reader.chunks())


class Pickled:
    def __reduce__(self):
        return (open, ("/tmp/combllama-pickle-ran", "w"))


def test_intact_memory_verifies(memory):
    assert memory.verify() == []


def test_truncated_chunk(memory, store, tiny):
    path = _first_chunk(memory)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptMemoryError, match="truncated"):
        _load_all(store, memory, tiny.fingerprint)


def test_flipped_bit(memory, store, tiny):
    path = _first_chunk(memory)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptMemoryError, match="checksum"):
        _load_all(store, memory, tiny.fingerprint)


def test_wrong_model_with_same_geometry(memory, store, tiny_dir_other):
    from combllama.core.model import ModelSpec, load_model

    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    with pytest.raises(IncompatibleMemoryError, match="another model"):
        _load_all(store, memory, other.fingerprint)


def test_newer_format_version(memory, store, tiny):
    m = dict(memory.manifest, format_version=2, min_reader_version=2)
    (memory.root / "MANIFEST.json").write_bytes(canonical_json(m))
    with pytest.raises(UnsupportedVersionError, match="newer combllama"):
        _load_all(store, memory, tiny.fingerprint)


def test_unknown_required_feature(memory, store, tiny):
    m = dict(memory.manifest, required_features=["quantum-keys"])
    (memory.root / "MANIFEST.json").write_bytes(canonical_json(m))
    with pytest.raises(UnsupportedVersionError, match="quantum-keys"):
        _load_all(store, memory, tiny.fingerprint)


def test_pickle_renamed_to_a_memory(memory, store, tiny, tmp_path):
    marker = "/tmp/combllama-pickle-ran"
    (memory.root / "MANIFEST.json").write_bytes(pickle.dumps(Pickled()))
    with pytest.raises(NotAMemoryError):
        _load_all(store, memory, tiny.fingerprint)
    import os
    assert not os.path.exists(marker)


def test_pickle_renamed_to_a_chunk(memory, store, tiny):
    _first_chunk(memory).write_bytes(pickle.dumps(Pickled()))
    with pytest.raises(CorruptMemoryError):
        _load_all(store, memory, tiny.fingerprint)


@pytest.mark.parametrize("mutate, error", [
    (lambda m: m["chunks"][0].update(file="../../etc/passwd"), CorruptMemoryError),
    (lambda m: m["chunks"][0].update(start=5), CorruptMemoryError),
    (lambda m: m["tokens"].update(count=10**12), CorruptMemoryError),
    (lambda m: m.update(format="something-else"), NotAMemoryError),
    (lambda m: m["chunks"][0]["tensors"].update(k=["F32", [-1]]), CorruptMemoryError),
])
def test_manifest_mutations(memory, store, tiny, mutate, error):
    m = json.loads((memory.root / "MANIFEST.json").read_text())
    mutate(m)
    (memory.root / "MANIFEST.json").write_bytes(seal_manifest(m))
    with pytest.raises(error):
        _load_all(store, memory, tiny.fingerprint)


def test_duplicate_keys_and_nan_in_manifest(memory, store, tiny):
    raw = (memory.root / "MANIFEST.json").read_text()
    (memory.root / "MANIFEST.json").write_text(raw[:-1] + ',"format":"combllama-memory"}')
    with pytest.raises(NotAMemoryError, match="duplicate"):
        _load_all(store, memory, tiny.fingerprint)
    (memory.root / "MANIFEST.json").write_text(raw.replace('"count":', '"count":NaN,"x":', 1))
    with pytest.raises(NotAMemoryError):
        _load_all(store, memory, tiny.fingerprint)


def test_nan_in_tensors(memory, store, tiny):
    import hashlib

    import torch
    from safetensors.torch import save

    rec = memory.manifest["chunks"][0]
    tensors = memory.chunk(rec)
    tensors["k"][0, 0, 0, 0] = float("nan")
    data = save({k: v.contiguous() for k, v in tensors.items()})
    sha = hashlib.sha256(data).hexdigest()
    new_file = f"chunks/000000-{sha[:12]}.safetensors"
    (memory.root / new_file).write_bytes(data)
    m = json.loads((memory.root / "MANIFEST.json").read_text())
    m["chunks"][0].update(file=new_file, sha256=sha, bytes=len(data))
    (memory.root / "MANIFEST.json").write_bytes(seal_manifest(m))  # checksums all valid: only the NaN check is left
    with pytest.raises(CorruptMemoryError, match="NaN"):
        _load_all(store, memory, tiny.fingerprint)
    assert torch.isnan(tensors["k"]).any()


@pytest.mark.parametrize("damage, code", [
    ("truncate", 6), ("bitflip", 6), ("newer", 7), ("pickle", 8), ("wrong-model", 5)])
def test_cli_one_line_error_and_exit_code(memory, tiny_dir, tiny_dir_other, damage, code):
    path = _first_chunk(memory)
    model = tiny_dir
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "bitflip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "newer":
        m = dict(memory.manifest, format_version=9, min_reader_version=9)
        (memory.root / "MANIFEST.json").write_bytes(canonical_json(m))
    elif damage == "pickle":
        (memory.root / "MANIFEST.json").write_bytes(pickle.dumps({"a": 1}))
    else:
        model = tiny_dir_other
    result = CliRunner().invoke(cli, ["ask", memory.root.name, "Who?", "--model", str(model), "--device", "cpu"])
    assert result.exit_code == code, result.output
    # Through the console-script entry point the error is one line.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from combllama.cli.main import main; main()", "ask",
                           memory.root.name, "Who?", "--model", str(model)], capture_output=True, text=True)
    assert proc.returncode == code
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
