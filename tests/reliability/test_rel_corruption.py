"""The corruption corpus (corrupt.py) over a real memory: only typed errors, nothing served that
differs from the intact memory, no pickle run, nothing attached after an error, bounded RSS."""
from __future__ import annotations

import pytest
from corrupt import run_corpus

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.methods import get_method


@pytest.mark.timeout(900)
def test_corruption_corpus(tiny, sample_doc, store):
    ingest(tiny, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=128))
    # CI: every cut in the first 512 bytes (length prefix and header), 60 random cuts and 150 bit flips
    # per file; the full run (harness.py) cuts every offset of the first 64 KiB and flips 1,000 bits per file.
    result = run_corpus(store.root / "m", tiny.fingerprint, flips=150, random_cuts=60, head_cuts=512)
    assert result.untyped == []
    assert result.silent == []
    assert not result.pickle_ran
    assert result.attach_reached_on_error == 0
    assert result.cases > 2000
    # Hostile lengths (2**62-byte headers, 10**12 tokens, 2**31-wide shapes) allocate nothing in proportion
    # to what they claim: memory follows the bytes actually read (tiny JSON objects cost ~20x their text).
    assert result.traced_cases > 100
    assert result.max_peak_per_input_byte < 32, result.max_peak_per_input_byte
    bound = 64 * 2 ** 20 + 48 * result.largest_case_bytes
    assert result.rss_growth_bytes < bound and result.rss_after_minus_before < bound, result.to_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "truncate", "kvcompose", "hcattention"])
@pytest.mark.parametrize("damage", ["truncate", "bitflip", "nan+sha"])
def test_damaged_memory_allocates_nothing_on_the_gpu(tiny_dir, sample_doc, store, method, damage):
    """The product's order (open → model check → attach over the verifying chunk reader) on CUDA: a
    damaged last chunk ends in a typed error with torch.cuda.memory_allocated unchanged."""
    import hashlib
    import json

    import torch
    from safetensors.torch import save

    from combllama.core.errors import CombllamaError
    from combllama.core.memory.format import seal_manifest
    from combllama.core.methods import from_manifest
    from combllama.core.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(tiny_dir), device="cuda", dtype="bfloat16"))
    budget = None if method == "full" else "0.5"
    from combllama.cli.ingest_cmd import choose_method

    ingest(loaded, sample_doc, choose_method(method, budget), store, name="g", config=EncodeConfig(chunk_tokens=64))
    reader = store.open("g")
    rec = [c for c in reader.manifest["chunks"] if c.get("file")][-1]
    path = reader.root / rec["file"]
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "bitflip":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:])
    else:
        tensors = reader.chunk(rec)
        key = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        new = save(tensors)
        sha = hashlib.sha256(new).hexdigest()
        rel = f"chunks/{rec['seq']:06d}-{sha[:12]}.safetensors"
        (reader.root / rel).write_bytes(new)
        m = json.loads((reader.root / "MANIFEST.json").read_text())
        m["chunks"][rec["seq"]].update(file=rel, sha256=sha, bytes=len(new))
        (reader.root / "MANIFEST.json").write_bytes(seal_manifest(m))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(CombllamaError):
        r = store.open("g")
        r.check_model(loaded.fingerprint)
        from_manifest(r.manifest).attach(loaded.model, r.manifest, r.chunks())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
