"""train/: shards from prepare.py respect the size limits and the split; a --smoke run trains on CPU in
seconds and writes an adapter that loads onto its base model; the teacher and student see aligned targets."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from safetensors.numpy import load_file

from combllama.core.methods.combllama.weights import load_adapter, read_header
from combllama.train import prepare, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_dir):
    text = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    words = "lantern room north wing keeper light storm the a of harbour".split()
    for i in range(3):
        (text / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(2500)))
    out = tmp_path_factory.mktemp("shards")
    prepare.main(["--out", str(out), "--text-dir", str(text), "--tokenizer", str(tiny_dir), "--max-mib", "1",
                  "--shard-mib", "0.02"])
    return out


def test_shards_have_a_manifest_and_stay_small(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2  # the per-shard cap split the stream
    total = 0
    for s in manifest["shards"]:
        data = load_file(str(shards / s["file"]))
        assert data["tokens"].dtype.name == "uint16" and data["tokens"].size == s["tokens"]
        assert s["bytes"] <= 0.02 * 2**20
        total += s["tokens"]
    assert total == sum(src["tokens"] for src in manifest["sources"])
    assert manifest["split"]["sotu_eval_from_year"] == 2015


def test_split_table_guards_the_sources():
    split = prepare.read_split()
    assert split["pg_essays"] == "eval" and split["sotu"] == "by-year"
    for name in prepare.SOURCES:
        assert split[name] in ("train", "by-year")
    with pytest.raises(SystemExit):
        prepare.main(["--out", "/nonexistent-never-written", "--mix", "pg_essays=1.0", "--tokenizer", "x"])


def test_strip_roff_keeps_text():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.TP\n.B \\-a\nall'
    text = prepare.strip_roff(src)
    assert "comment" not in text and "TH" not in text
    assert "ls - list directory contents" in text and "-a" in text


def test_chunk_lengths_cover_the_context():
    rng = random.Random(1)
    for total in (16, 100, 2048):
        lens = train.chunk_lengths(rng, total, 16, 48)
        assert sum(lens) == total and all(1 <= n <= 48 for n in lens)


@pytest.mark.parametrize("recent", [0, 32])
def test_teacher_and_student_predict_the_same_tokens(shards, tiny, recent):
    args = train.parse(["--smoke", "--data", str(shards), "--recent-max", str(recent), "--recent-zero", "0"])
    args.copy_frac = 0.0
    data = train.Shards(shards, tiny.model.config.vocab_size)
    prefix = [1, 2, 3]
    teach, head, dec, enc, cu, index, after, y = train.make_batch(data, random.Random(0), args, prefix,
                                                                  torch.device("cpu"))
    B, C, T = args.batch, args.context, args.cont
    W = head.shape[1] - 3
    assert (W == 0) == (recent == 0) and 0 <= W <= recent
    M = C - W  # context tokens in the cross memory
    assert teach.shape == (B, 3 + C + T - 1) and dec.shape == (B, T - 1) and y.shape == (B, T - 1)
    assert enc.shape == (B * M,) and int(cu[-1]) == B * M and index.shape == enc.shape
    for b in range(B):
        # Teacher and student both read y[:-1] after the prefix and the context; the last T-1 logits predict y[1:].
        assert teach[b, -(T - 1):].tolist() == dec[b].tolist()
        assert teach[b, -(T - 2):].tolist() == y[b, :-1].tolist()
        assert head[b, :3].tolist() == prefix
        # The context: its first M tokens are cross memory, its last W the head's recent tail.
        assert teach[b, 3:3 + M].tolist() == enc[b * M:(b + 1) * M].tolist()
        assert teach[b, 3 + M:3 + C].tolist() == head[b, 3:].tolist()
    # after: the memory tokens that follow each chunk in its sample (0 for a sample's last chunk)
    ends = [int(c) for c in cu[1:]]
    assert after.tolist() == [-e % M for e in ends]


@pytest.mark.parametrize("recent", [0, 32])
def test_memory_use_check_reads_the_next_samples_memory(shards, tiny, recent):
    """Student(shift=1) gives sample b exactly what sample b+1's memory gives it."""
    from combllama.core.methods.combllama.modules import CombAdapter, CombConfig, install_hooks

    args = train.parse(["--smoke", "--data", str(shards), "--recent-max", str(recent), "--recent-zero", "0"])
    data = train.Shards(shards, tiny.model.config.vocab_size)
    teach, head, dec, enc, cu, index, after, y = train.make_batch(data, random.Random(0), args, [1, 2],
                                                                  torch.device("cpu"))
    adapter = CombAdapter.from_base(tiny.model, CombConfig.for_model(tiny.model.config, rank=2, encoder="base"))
    for block in adapter.cross:
        block.attn_gate.data.fill_(0.5)
    install_hooks(tiny.model)
    student = train.Student(adapter, tiny.model).eval()
    M = args.context - (head.shape[1] - 2)
    cu1 = torch.tensor([int(c) - M for c in cu if M <= int(c) <= 2 * M], dtype=torch.int32)  # sample 1's chunks
    with torch.no_grad():
        shifted = student(enc, cu, index, head, dec, shift=1)
        own = student(enc, cu, index, head, dec)
        other = student(enc[M:2 * M], cu1, index[M:2 * M], head[:1], dec[:1])  # sample 0 reading sample 1's memory
    assert shifted.shape == (args.batch, args.cont - 1, tiny.model.config.vocab_size)
    torch.testing.assert_close(shifted[0], other[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted[0], own[0], atol=1e-4)


@pytest.mark.parametrize("encoder,extra", [("base", []), ("stack", []), ("base", ["--null-slot"]),
                                           ("base", ["--null-slot", "--positions", "document"]),
                                           ("base", ["--cross-every", "1"]),
                                           ("base", ["--recent-max", "32", "--recent-zero", "0.5"])])
def test_smoke_run_writes_a_loadable_adapter(shards, tiny, tiny_dir, tmp_path, encoder, extra):
    out = tmp_path / "run"
    summary = train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(out),
                          "--steps", "3", "--name", "tiny", "--encoder", encoder, *extra])
    assert summary["steps"] == 3
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    # The memory-use check: the same batch read through another sample's memory, logged beside the KL.
    assert all(float(r["kl_other"]) >= 0 for r in rows)
    path = out / "tiny.safetensors"
    meta = read_header(path)
    assert meta["base_fingerprint"] == tiny.fingerprint and meta["info"]["step"] == 3
    assert meta["config"].encoder == encoder and meta["config"].null_slot == ("--null-slot" in extra)
    assert meta["config"].cross_layers == ((0, 1) if "--cross-every" in extra else (1,))  # a 2-layer model
    assert meta["config"].positions == ("document" if "document" in extra else "chunk")
    adapter = load_adapter(path, tiny.model)
    # The gates moved off zero: the adapter now reads its memory.
    assert all(float(b.attn_gate.abs()) > 0 for b in adapter.cross)
    assert json.loads((out / "train_summary.json").read_text())["adapter_bytes"] == path.stat().st_size


def test_init_starts_from_a_previous_adapter(shards, tiny, tiny_dir, tmp_path):
    """--init loads a smoke run's adapter as the starting weights: with 0 steps the saved file holds the same
    tensors (bf16 → fp32 master → bf16 is exact), and the run records where it started."""
    from safetensors.torch import load_file

    from combllama.core.methods.combllama.weights import file_digest

    first = tmp_path / "a"
    train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(first), "--steps", "3",
                "--name", "tiny"])
    src = first / "tiny.safetensors"
    second = tmp_path / "b"
    summary = train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(second),
                          "--steps", "0", "--name", "tiny", "--init", str(src)])
    assert summary["steps"] == 0
    assert summary["init"]["sha256"] == file_digest(src).hex() and summary["init"]["steps"] == 3
    a, b = load_file(str(src)), load_file(str(second / "tiny.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert any(float(a[k].abs().max()) > 0 for k in a if k.endswith("_gate"))  # trained, not zero-initialised
    assert read_header(second / "tiny.safetensors")["info"]["init"]["path"] == str(src)
    # A continuation trains on from there: its first logged step is not the zero-gate start.
    third = tmp_path / "c"
    train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(third), "--steps", "1",
                "--name", "tiny", "--init", str(src)])
    fresh = list(csv.DictReader(open(first / "train_log.csv")))[0]
    cont = list(csv.DictReader(open(third / "train_log.csv")))[0]
    assert float(cont["gate_attn_mean"]) > float(fresh["gate_attn_mean"])


def test_init_refuses_another_config(shards, tiny_dir, tmp_path):
    first = tmp_path / "a"
    train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(first), "--steps", "1",
                "--name", "tiny"])
    with pytest.raises(SystemExit, match="config differs"):
        train.main(["--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(tmp_path / "b"),
                    "--steps", "1", "--name", "tiny", "--rank", "2", "--init", str(first / "tiny.safetensors")])


def test_two_process_ddp_run_on_cpu(shards, tiny, tiny_dir, tmp_path):
    """The same script under torchrun with 2 processes (gloo on CPU): DDP averages the gradients, every rank
    stops at the same step, rank 0 writes the adapter. (No 2-GPU machine was lent; this is the N > 1 path.)"""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "combllama.train.train", "--smoke", "--model", str(tiny_dir), "--data", str(shards), "--out", str(out),
           "--steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world"] == 2 and summary["steps"] == 2
    from combllama.core.prompt import DEFAULT_SYSTEM, memory_prefix_ids

    args = train.parse(["--smoke"])
    prefix = len(memory_prefix_ids(tiny.tokenizer, DEFAULT_SYSTEM))
    per_step = args.batch * (prefix + args.context + args.cont - 1)
    assert summary["tokens_seen"] == 2 * 2 * per_step  # two steps of both ranks' samples
    from pathlib import Path

    assert load_adapter(Path(summary["adapter"]), tiny.model) is not None


@pytest.mark.parametrize("recent", [0, 150])
def test_student_reads_what_attach_gives(tiny, long_doc, store, tmp_path, recent):
    """Train/inference parity: the student, given a document's chunks, tail and a continuation, computes the
    logits that ingest → attach → prefill compute for the same continuation after that memory."""
    from combllama.core.encode import EncodeConfig, ingest, plan_memory
    from combllama.core.methods import Budget, from_manifest, get_method
    from combllama.core.methods.base import prefill
    from combllama.core.methods.combllama.method import resolve_adapter
    from combllama.core.methods.combllama.modules import CombAdapter, CombConfig
    from combllama.core.methods.combllama.weights import save_adapter, weights_fingerprint

    model = tiny.model
    torch.manual_seed(3)
    trained = CombAdapter.from_base(model, CombConfig.for_model(model.config, rank=4, encoder="base", null_slot=True))
    for p in trained.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    for block in trained.cross:
        block.attn_gate.data.fill_(0.7)
    path = tmp_path / "gated.safetensors"
    save_adapter(path, trained, base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(model),
                 base_name=tiny.name, info={})
    method = get_method("combllama", {"adapter": str(path), "recent": recent}, Budget(fraction=1.0))  # unpruned
    config = EncodeConfig(chunk_tokens=128)
    ingest(tiny, long_doc, method, store, name=f"parity{recent}", config=config)
    reader = store.open(f"parity{recent}")
    memory = from_manifest(reader.manifest).attach(model, reader.manifest, reader.chunks())
    cont = tiny.tokenizer("The keeper lit the lantern in the north wing.", add_special_tokens=False)["input_ids"]
    want = prefill(model, cont, memory.cache, memory.logical_length, memory.lengths[0], all_logits=True)

    plan = plan_memory(tiny, long_doc, method, config)
    ids, P = plan.ids, plan.n_prefix
    tail = len(ids) - recent
    enc, cu, index, after = [], [0], [], []
    for i, (s, e) in enumerate(plan.spans):  # each chunk's cross part, indexed by its chunk number
        part = ids[max(s, P):min(e, tail)]
        if part:
            enc += part
            cu.append(cu[-1] + len(part))
            index += [i] * len(part)
            after.append(tail - min(e, tail))
    t = torch.tensor
    student = train.Student(resolve_adapter(model, str(path))[0], model).eval()
    with torch.no_grad():
        got = student(t(enc), t(cu, dtype=torch.int32), t(index), t([ids[:P] + ids[tail:]]), t([cont]), after=t(after))
    assert got.shape == (1, len(cont), model.config.vocab_size)
    torch.testing.assert_close(got[0], want.float(), atol=1e-4, rtol=1e-4)
