"""Every way a memory can be wrong ends in one typed error (and, through the CLI, one line and its
own exit code) before anything reaches a device."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
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


# --- reliability cases 2, 6, 7, 8 and 9: the rest of each case ---------------------------------------------

def _flip_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_names_each_damaged_chunk(memory):
    """Case 2: verify() lists the damaged chunks, and only them, each by number and file name."""
    records = memory.manifest["chunks"]
    assert len(records) >= 3
    damaged = [records[1], records[-1]]
    for rec in damaged:
        _flip_middle(memory.root / rec["file"])
    problems = memory.verify()
    assert len(problems) == 2, problems
    for problem, rec in zip(problems, damaged):
        assert f"chunk {rec['seq']}:" in problem and "checksum mismatch" in problem
        assert rec["file"].split("/")[1] in problem


def test_cli_info_verify_names_the_damaged_chunk(memory):
    """Case 2 through the CLI: `info --verify` exits 6 and its verify row (and --json problems) name the chunk."""
    rec = memory.manifest["chunks"][1]
    _flip_middle(memory.root / rec["file"])
    name = memory.root.name
    r = CliRunner().invoke(cli, ["info", name, "--verify"])
    assert r.exit_code == 6, r.output
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("verify"))
    assert f"chunk {rec['seq']}: checksum mismatch in {rec['file'].split('/')[1]}" in row
    r = CliRunner().invoke(cli, ["info", name, "--verify", "--json"])
    assert r.exit_code == 6
    problems = json.loads(r.stdout)["problems"]
    assert len(problems) == 1 and rec["file"].split("/")[1] in problems[0]
    assert CliRunner().invoke(cli, ["info", name]).exit_code == 0  # without --verify no chunk is read


def test_fingerprint_covers_tokenizer_chat_template_and_rope_scaling(tiny):
    """Case 6: each of a tokenizer with other merges or other added tokens, another chat template and another
    rope scaling gives another fingerprint; the same model gives the same one, in float32 or bfloat16 (dtype
    is deliberately not part of it: a memory written on a GPU in bf16 opens on a CPU in fp32)."""
    import copy
    import types

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from combllama.core.model import fingerprint

    model, tok = tiny.model, tiny.tokenizer
    base = fingerprint(model, tok)
    assert base == tiny.fingerprint and base.startswith("cmfp1:")

    fewer_merges = json.loads(tok.backend_tokenizer.to_str())
    fewer_merges["model"]["merges"] = fewer_merges["model"]["merges"][:-2000]
    other_merges = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(fewer_merges)))
    other_merges.chat_template = tok.chat_template
    added = copy.deepcopy(tok)
    added.add_tokens(["<|combllama_other|>"], special_tokens=True)
    template = copy.deepcopy(tok)
    template.chat_template = (tok.chat_template or "") + "{# another template #}"
    config = copy.deepcopy(model.config)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    rope = types.SimpleNamespace(config=config, state_dict=model.state_dict)
    prints = {"merges": fingerprint(model, other_merges), "added token": fingerprint(model, added),
              "chat template": fingerprint(model, template), "rope scaling": fingerprint(rope, tok)}
    assert all(p != base for p in prints.values()), prints
    assert len(set(prints.values())) == len(prints)
    assert fingerprint(copy.deepcopy(model).to(torch.bfloat16), tok) == base


def test_wrong_model_error_shows_both_fingerprints(memory, store, tiny, tiny_dir_other):
    """Case 6: the refusal names the memory's print and the loaded model's, in short form, on one line."""
    from combllama.core.model import ModelSpec, load_model

    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    with pytest.raises(IncompatibleMemoryError) as err:
        _load_all(store, memory, other.fingerprint)
    message = str(err.value)
    assert f"memory {tiny.fingerprint[:18]}…" in message and f"loaded model {other.fingerprint[:18]}…" in message
    assert tiny.fingerprint[:18] != other.fingerprint[:18] and "\n" not in message
    r = CliRunner().invoke(cli, ["ask", memory.root.name, "Who?", "--model", str(tiny_dir_other), "--device", "cpu"])
    assert r.exit_code == 5 and tiny.fingerprint[:18] in r.stderr and other.fingerprint[:18] in r.stderr


def test_newer_format_this_reader_may_read_loads_silently(memory, store, tiny):
    """Case 7: format_version 2 with min_reader_version 1 and fields this reader does not know (the format's
    forward compatibility; it has no optional-feature list) loads, answers like the original, and warns
    nothing: no Python warning, nothing on stderr."""
    import warnings

    from combllama.core.methods import from_manifest

    ref = from_manifest(memory.manifest).attach(tiny.model, memory.manifest, memory.chunks())
    m = json.loads((memory.root / "MANIFEST.json").read_text())
    m.update(format_version=2, min_reader_version=1, hologram={"layers": [1, 2]})
    m["chunks"][0]["future_field"] = "x"
    (memory.root / "MANIFEST.json").write_bytes(seal_manifest(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = store.open(memory.root.name)
        reader.check_model(tiny.fingerprint)
        assert reader.verify() == []
        got = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    assert reader.manifest["format_version"] == 2
    for a, b in zip(ref.cache.layers, got.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    r = CliRunner().invoke(cli, ["info", memory.root.name, "--verify"])
    assert r.exit_code == 0 and r.stderr == ""


def test_manifest_of_before_its_checksum_still_loads(memory, store, tiny):
    """Case 7, the older side: a manifest without manifest_sha256 (written before the field existed) loads."""
    m = json.loads((memory.root / "MANIFEST.json").read_text())
    del m["manifest_sha256"]
    (memory.root / "MANIFEST.json").write_bytes(canonical_json(m))
    _load_all(store, memory, tiny.fingerprint)
    assert store.open(memory.root.name).verify() == []


def _rewrite_chunks(memory, edit, **model_fields):
    """Replace each chunk file by edit(record, tensors) with valid checksums, names and tensor specs, and set
    `model_fields` in the manifest: the files agree with the manifest, so only the method's own read-time
    checks are left to refuse the memory."""
    import hashlib

    from combllama.core.memory.bundle import _tensor_bytes

    m = json.loads((memory.root / "MANIFEST.json").read_text())
    for rec in m["chunks"]:
        if not rec.get("file"):
            continue
        tensors = edit(rec, {k: v.clone() for k, v in memory.chunk(rec).items()})
        data, specs = _tensor_bytes(tensors)
        sha = hashlib.sha256(data).hexdigest()
        rec.update(file=f"chunks/{rec['seq']:06d}-{sha[:12]}.safetensors", sha256=sha, bytes=len(data), tensors=specs)
        (memory.root / rec["file"]).write_bytes(data)
    m["model"].update(model_fields)
    (memory.root / "MANIFEST.json").write_bytes(seal_manifest(m))
    return m


def _attach_counting_reads(store, name, model, monkeypatch):
    """Attach memory `name` to `model`; returns the chunk files read before it returned or raised."""
    import combllama.core.memory.bundle as bundle
    from combllama.core.methods import from_manifest

    reads, real = [], bundle._load_verified
    monkeypatch.setattr(bundle, "_load_verified", lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k))
    reader = store.open(name)
    try:
        from_manifest(reader.manifest).attach(model, reader.manifest, reader.chunks())
    finally:
        monkeypatch.setattr(bundle, "_load_verified", real)
    return reads


@pytest.mark.parametrize("field, value, edit", [
    ("n_layers", 1, lambda t: t[:1]),
    ("n_kv_heads", 1, lambda t: t[:, :1]),
    ("head_dim", 8, lambda t: t[..., :8]),
])
@pytest.mark.parametrize("recorded", [False, True], ids=["manifest-model-kept", "manifest-model-edited"])
def test_memory_consistent_in_itself_but_not_with_the_model(memory, store, tiny, monkeypatch, field, value, edit,
                                                            recorded):
    """Case 8: chunks and manifest agree with each other (verify passes, the fingerprint is the model's) but
    their layers / KV heads / head dim are not the model's: a typed error before any chunk is read."""
    _rewrite_chunks(memory, lambda rec, t: {k: edit(v).contiguous() for k, v in t.items()},
                    **({field: value} if recorded else {}))
    reader = store.open(memory.root.name)
    assert reader.verify() == []
    reader.check_model(tiny.fingerprint)
    reads = []
    with pytest.raises(CorruptMemoryError) as err:
        reads = _attach_counting_reads(store, memory.root.name, tiny.model, monkeypatch)
    assert reads == []  # refused from the manifest: no chunk read, nothing attached
    message = str(err.value)
    assert "\n" not in message
    if recorded:
        have = dict(zip(("n_layers", "n_kv_heads", "head_dim"), tiny.kv_shape))[field]
        assert f"manifest says model.{field} = {value}, the model has {have}" in message
    else:
        assert "chunk 0: tensor 'k' is F32" in message and "the model has 2 layers, 2 KV heads, head dim 16" in message


def test_cli_refuses_a_memory_of_other_geometry_with_exit_6(memory, tiny_dir):
    _rewrite_chunks(memory, lambda rec, t: {k: v[:1].contiguous() for k, v in t.items()})
    r = CliRunner().invoke(cli, ["ask", memory.root.name, "Who?", "--model", str(tiny_dir), "--device", "cpu"])
    assert r.exit_code == 6 and "the model has 2 layers" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _method_memory(tiny, sample_doc, store, name, params=None, budget=None):
    from combllama.core.methods import Budget

    method = get_method(name, params, Budget(fraction=budget) if budget else None)
    result = ingest(tiny, sample_doc, method, store, name=name, config=EncodeConfig(chunk_tokens=64))
    return store.open(result.name)


def _first_run_at_least_two(t):
    return next(i for i, c in enumerate(t["counts"].reshape(-1).tolist()) if c >= 2)


@pytest.mark.parametrize("damage, match", [
    ("count-sum", "do not split"),
    ("count-negative", "do not split"),
    ("pos-outside", "outside the chunk"),
    ("pos-order", "not increasing"),
])
def test_kvcompose_indices_out_of_range_are_refused(tiny, sample_doc, store, monkeypatch, damage, match):
    """Case 9 (kvcompose): counts that do not split the entries into per-head runs, and positions outside the
    chunk or out of order, are a corrupt memory (they would cut runs from the wrong rows or re-rotate keys to
    wrong positions), for attach and for hcattention's serve of the memory alike."""
    from combllama.core.methods.hcattention import serve

    reader = _method_memory(tiny, sample_doc, store, "kvcompose", budget=0.5)

    def edit(rec, t):
        if rec["seq"] != 1:
            return t
        counts, pos = t["counts"].view(-1), t["pos"]
        if damage == "count-sum":
            counts[0] += 1
        elif damage == "count-negative":
            counts[0], counts[1] = -1, counts[1] + counts[0] + 1
        elif damage == "pos-outside":
            pos[0] = 10**9
        else:
            run = _first_run_at_least_two(t)
            at = int(t["counts"].view(-1)[:run].sum())
            pos[at], pos[at + 1] = pos[at + 1].clone(), pos[at].clone()
        return t

    _rewrite_chunks(reader, edit)
    assert store.open("kvcompose").verify() == []
    with pytest.raises(CorruptMemoryError, match=f"kvcompose chunk 1: kvcompose .*{match}"):
        _attach_counting_reads(store, "kvcompose", tiny.model, monkeypatch)
    reader = store.open("kvcompose")
    with pytest.raises(CorruptMemoryError, match=match):
        serve(tiny.model, reader.manifest, reader.chunks())


@pytest.mark.parametrize("damage, match", [
    ("code", "key codes 0..200 out of range for 16 centroids"),
    ("scale-zero", "k_scale 0"),
    ("scale-huge", "v_scale .* out of range"),
    ("codes-dtype", "codes I16"),
])
def test_hcattention_codes_and_scales_out_of_range_are_refused(tiny, sample_doc, store, monkeypatch, damage, match):
    """Case 9 (hcattention): a key code past its codebook (it indexes a device buffer), an int8 scale of zero
    or one whose dequantized rows overflow the model's dtype, and codes of the wrong width are refused."""
    reader = _method_memory(tiny, sample_doc, store, "hcattention",
                            {"value_bits": 8, "centroids": 16, "calib_tokens": 64, "calib_span": 64, "tau": 1.0})
    with_codes = next(r["seq"] for r in reader.manifest["chunks"] if "codes" in r["tensors"])

    def edit(rec, t):
        if rec["seq"] != with_codes:
            return t
        if damage == "code":
            t["codes"].view(-1)[5] = 200
        elif damage == "scale-zero":
            t["k_scale"].view(-1)[3] = 0.0
        elif damage == "scale-huge":
            t["v_scale"].view(-1)[3] = 1e38
        else:
            t["codes"] = t["codes"].to(torch.int16)
        return t

    _rewrite_chunks(reader, edit)
    assert store.open("hcattention").verify() == []
    with pytest.raises(CorruptMemoryError, match=f"hcattention.*{match}"):
        _attach_counting_reads(store, "hcattention", tiny.model, monkeypatch)
