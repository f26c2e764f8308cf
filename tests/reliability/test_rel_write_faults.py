"""Write-path faults: ENOSPC/EIO on the Nth os call and lost fsyncs (writefaults.py), real disk-full
from the kernel (RLIMIT_FSIZE) for an ingest through the CLI and for the sessions database, and the
free-disk check before an ingest."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from faults import OPS, Fault, Shim
from writefaults import call_counts, ingest_doc, run_matrix, snapshot, temp_files

from combllama.cli.main import cli
from combllama.core.encode import EncodeConfig, ingest
from combllama.core.errors import ResourceError
from combllama.core.memory.durable import write_atomic
from combllama.core.methods import get_method
from combllama.sessions.store import SessionStore


def setup_home(home: Path, loaded, sample_doc, store) -> None:
    """A sealed memory "keep" and a sessions database with turns: what a fault must never touch."""
    ingest(loaded, sample_doc, get_method("full"), store, name="keep", config=EncodeConfig(chunk_tokens=128))
    with SessionStore(home / "data" / "sessions.db") as s:
        s.create("chat", memories=["keep"])
        for i in range(5):
            s.append_turn("chat", f"question {i}", f"answer {i}")


def spread(n: int) -> list[int]:
    """A few call numbers across 1..n: first, middle, last."""
    return sorted({1, max(1, n // 2), n})


@pytest.mark.timeout(900)
def test_fault_matrix_enospc_eio_lost_fsync(tiny, sample_doc, store, isolated_home):
    setup_home(isolated_home, tiny, sample_doc, store)
    ingest_doc(tiny, sample_doc, store, "ref")
    reference = [c["sha256"] for c in store.open("ref").manifest["chunks"]]
    store.remove("ref")
    counts = call_counts(tiny, sample_doc, store)
    # CI: ENOSPC at the first, middle and last call of each function, EIO at the middle one, two lost
    # fsyncs (the full run, tests/reliability/harness.py, injects at every call).
    faults = [Fault(op, n, "ENOSPC") for op in OPS for n in spread(counts[op])]
    faults += [Fault(op, max(1, counts[op] // 2), "EIO") for op in OPS]
    faults += [Fault("fsync", n, "lose") for n in (2, max(2, counts["fsync"] - 1))]
    result = run_matrix(tiny, sample_doc, isolated_home, faults, reference)
    assert result.failures == [], "\n".join(result.failures)
    assert result.injected + result.lost_fsyncs + result.not_reached == len(faults)
    assert result.injected >= 12 and result.resumed_equal == result.injected
    assert result.lost_fsyncs >= 1 and result.lost_detected + result.lost_harmless == result.lost_fsyncs
    assert set(result.errors_seen) <= {"ResourceError", "CorruptMemoryError", "NotAMemoryError"}


def test_write_atomic_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    for fault in [Fault("write", 1, "ENOSPC"), Fault("fsync", 1, "EIO"), Fault("replace", 1, "EIO"),
                  Fault("open", 1, "ENOSPC")]:
        with Shim(fault), pytest.raises(ResourceError) as err:
            write_atomic(target, b"new" * 1000)
        assert target.read_bytes() == b"old"
        assert os.listdir(tmp_path) == ["f.json"], fault
        assert ("disk full" in str(err.value)) == (fault.action == "ENOSPC")


def test_write_atomic_call_order(tmp_path):
    """Durability order: write → fsync(tmp) → replace → fsync(dir)."""
    calls = []
    real = {op: getattr(os, op) for op in ("write", "fsync", "replace")}

    def spy(op):
        def f(*a, **k):
            calls.append(op)
            return real[op](*a, **k)
        return f

    for op in real:
        setattr(os, op, spy(op))
    try:
        write_atomic(tmp_path / "x", b"data")
    finally:
        for op, fn in real.items():
            setattr(os, op, fn)
    assert calls == ["write", "fsync", "replace", "fsync"]


def _limited(nbytes: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


@pytest.mark.timeout(300)
def test_cli_ingest_on_a_full_disk_exits_4_and_keeps_the_other_memory(tmp_path, tiny_dir, tiny, sample_doc, store,
                                                                      isolated_home):
    setup_home(isolated_home, tiny, sample_doc, store)
    keep = snapshot(isolated_home / "memories" / "keep")
    doc = tmp_path / "big.txt"
    doc.write_text(sample_doc.joined() * 3)
    # The kernel refuses any file over 20 KB: the first chunk file of 64 tokens × 2 layers is ~33 KB.
    proc = subprocess.run([sys.executable, "-c", "from combllama.cli.main import main; main()", "ingest", str(doc),
                           "--model", str(tiny_dir), "--device", "cpu", "--chunk-tokens", "256", "--name", "big"],
                          capture_output=True, text=True, preexec_fn=_limited(20_000))
    assert proc.returncode == 4, proc.stderr
    assert "disk full" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert snapshot(isolated_home / "memories" / "keep") == keep
    assert temp_files(isolated_home / "memories") == []
    with SessionStore(isolated_home / "data" / "sessions.db") as s:
        assert [t.answer for t in s.turns("chat")] == [f"answer {i}" for i in range(5)]


SESSIONS_CHILD = """
import sys
from combllama.sessions.store import SessionStore
from combllama.sessions.errors import SessionError
try:
    with SessionStore(sys.argv[1]) as s:
        if sys.argv[2] == "pages":  # SQLite's own full-disk simulation: no page past the current count
            s.db.execute("PRAGMA max_page_count = " + str(s.db.execute("PRAGMA page_count").fetchone()[0]))
        s.append_turn("chat", "big question", "x" * 2_000_000)
except SessionError as e:
    print(type(e).__name__, e.exit_code, str(e).count(chr(10)))
    sys.exit(e.exit_code)
print("saved")
"""


@pytest.mark.parametrize("how, error, code", [
    ("pages", "SessionDiskFullError", 4),  # SQLITE_FULL, what ENOSPC becomes inside SQLite
    ("fsize", "SessionDatabaseError", 1),  # EFBIG from the kernel: SQLite reports SQLITE_IOERR_WRITE
])
def test_sessions_database_on_a_full_disk(isolated_home, how, error, code):
    db = isolated_home / "data" / "sessions.db"
    with SessionStore(db) as s:
        s.create("chat")
        for i in range(5):
            s.append_turn("chat", f"question {i}", f"answer {i}")
    size = max(p.stat().st_size for p in db.parent.iterdir())
    proc = subprocess.run([sys.executable, "-c", SESSIONS_CHILD, str(db), how], capture_output=True, text=True,
                          preexec_fn=_limited(size + 64 * 1024) if how == "fsize" else None)
    assert proc.stdout.split()[:3] == [error, str(code), "0"], proc.stdout + proc.stderr
    assert proc.returncode == code
    with SessionStore(db) as s:  # every earlier turn intact, the failed one absent, and writable again
        assert [(t.question, t.answer) for t in s.turns("chat")] == [(f"question {i}", f"answer {i}")
                                                                    for i in range(5)]
        s.append_turn("chat", "after", "ok")
        assert s.turns("chat")[-1].answer == "ok"


def test_free_disk_is_checked_before_ingest(tiny, sample_doc, store, monkeypatch, tiny_dir, tmp_path):
    import shutil as _shutil

    import combllama.core.encode as encode

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(encode.shutil, "disk_usage", lambda p: usage._replace(free=1024 * 1024))
    with pytest.raises(ResourceError, match="not enough disk space") as err:
        ingest(tiny, sample_doc, get_method("full"), store, name="nope")
    assert "COMBLLAMA_MEMORY_DIR" in str(err.value)
    assert not (store.root / "nope").exists()  # refused before anything was written
    doc = tmp_path / "doc.md"
    doc.write_text(sample_doc.joined())
    result = CliRunner().invoke(cli, ["ingest", str(doc), "--model", str(tiny_dir), "--device", "cpu"])
    assert result.exit_code == 4 and "not enough disk space" in result.output


def test_disk_estimate_covers_what_is_written(tiny, sample_doc, store):
    from combllama.core.encode import disk_needed, plan_memory

    method = get_method("full")
    plan = plan_memory(tiny, sample_doc, method, EncodeConfig(chunk_tokens=64))
    ingest(tiny, sample_doc, method, store, name="m", config=EncodeConfig(chunk_tokens=64))
    written = sum(p.stat().st_size for p in (store.root / "m").rglob("*") if p.is_file())
    estimate = disk_needed(plan, method, tiny)
    assert written <= estimate <= 1.5 * written + 64 * 1024, (written, estimate)
    assert json.loads((store.root / "m" / "MANIFEST.json").read_text())["ingest"]["state"] == "complete"


def test_bundle_renames_are_each_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    """Durability order for the directory renames of a memory: replace_bundle (--force) and remove_bundle
    rename, then fsync the parent directory before anything else happens."""
    import combllama.core.memory.bundle as bundle

    calls = []
    real_replace, real_fsync_dir = os.replace, bundle.fsync_dir
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(bundle, "fsync_dir", lambda d: calls.append(("fsync_dir", Path(d).name)) or real_fsync_dir(d))
    for name in ("m", ".m.replacing"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "MANIFEST.json").write_text(name)
    bundle.replace_bundle(tmp_path / ".m.replacing", tmp_path / "m")
    assert [c[0] for c in calls] == ["replace", "replace", "fsync_dir"] and calls[1][1] == "m"
    assert (tmp_path / "m" / "MANIFEST.json").read_text() == ".m.replacing"
    calls.clear()
    bundle.remove_bundle(tmp_path / "m")
    assert [c[0] for c in calls] == ["replace", "fsync_dir"] and not (tmp_path / "m").exists()


def test_rolling_a_cut_swap_forward_fsyncs_the_directory(tmp_path, monkeypatch):
    """The third directory rename: MemoryStore finishing a --force swap cut between its two renames."""
    import combllama.core.memory.store as store_mod
    from combllama.core.memory.bundle import MemoryReader

    calls = []
    real_replace, real_fsync_dir = os.replace, store_mod.fsync_dir
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    monkeypatch.setattr(store_mod, "fsync_dir", lambda d: calls.append("fsync_dir") or real_fsync_dir(d))
    (tmp_path / ".m.replacing").mkdir()
    monkeypatch.setattr(MemoryReader, "__init__", lambda self, root, manifest=None: setattr(self, "root", root))
    monkeypatch.setattr(MemoryReader, "complete", property(lambda self: True))
    assert store_mod.MemoryStore(tmp_path).finish_replacements() == []  # the constructor already did it
    assert calls == ["replace", "fsync_dir"] and (tmp_path / "m").is_dir()


def _fsync_log(monkeypatch) -> list:
    """Records ("fsync", path) and ("replace", src, dst) for os.fsync / os.replace (paths of fds from os.open)."""
    log, paths = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        paths[fd] = Path(os.path.abspath(path))
        return fd

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", lambda fd: log.append(("fsync", paths.get(fd))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b, **k: log.append(("replace", Path(os.path.abspath(a)),
                                                                     Path(os.path.abspath(b)))) or real_replace(a, b, **k))
    return log


def _assert_published(log: list, target: Path) -> None:
    """`target` came in by one rename of a directory whose every file and subdirectory (and itself) had been
    fsynced before it, and the parent directory was fsynced after it (case 16 for a directory)."""
    renames = [i for i, e in enumerate(log) if e[0] == "replace" and e[2] == target]
    assert len(renames) == 1, log
    at = renames[0]
    src = log[at][1]
    synced_before = {e[1] for e in log[:at] if e[0] == "fsync"}
    inside = [target, *target.rglob("*")]
    assert inside[1:] and all(src / p.relative_to(target) in synced_before for p in inside), (inside, synced_before)
    assert ("fsync", target.parent) in log[at + 1:], log[at:]


def _small_llama_and_tokenizer():
    """A 2-layer random Llama and a word-level tokenizer built in process (no model files, no conversion)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(125))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_publish_dir_order_and_replacement(tmp_path, monkeypatch):
    """Durability order for a directory written whole: fsync of every file and directory in it, the rename,
    then the parent's fsync; a stale directory at the target is replaced."""
    from combllama.core.memory.durable import publish_dir

    tmp, target = tmp_path / "cache.tmp", tmp_path / "cache"
    (tmp / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.json", "sub/b.safetensors", "sub/deeper/COMPLETE"):
        (tmp / rel).write_text(rel)
    (target / "old").mkdir(parents=True)
    (target / "old" / "stale.bin").write_text("stale")
    log = _fsync_log(monkeypatch)
    publish_dir(tmp, target)
    _assert_published(log, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == \
        ["a.json", "sub/b.safetensors", "sub/deeper/COMPLETE"]
    assert not tmp.exists()


def test_embedded_model_caches_are_published_durably(tmp_path, monkeypatch):
    """Case 16 for core/model.py: the tokenizer-only cache and the converted-model cache each come in by
    publish_dir's order. The GGUF readers are replaced by a small in-process model (the order, not the
    25-second dequantization, is under test). It also covers a NameError the tokenizer cache raised on its
    first build."""
    import transformers

    from combllama.core import model as model_mod
    from combllama.core.paths import Paths

    small, tokenizer = _small_llama_and_tokenizer()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: small.config)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: small)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    paths = Paths.from_env({"COMBLLAMA_HOME": str(tmp_path / "home"), "COMBLLAMA_CACHE_DIR": str(tmp_path / "cache")})
    log = _fsync_log(monkeypatch)
    tok_dir = model_mod.embedded_tokenizer_dir(paths)
    _assert_published(log, tok_dir)
    assert (tok_dir / "COMPLETE").is_file() and (tok_dir / "config.json").is_file()
    log.clear()
    converted = model_mod.embedded_dir(paths)
    _assert_published(log, converted)
    assert (converted / "model.safetensors").is_file() and (converted / "COMPLETE").is_file()
    assert not list(converted.parent.glob("*.tmp"))


def test_adapter_file_is_written_atomically_and_durably(tmp_path, monkeypatch):
    """Case 16 for core/methods/combllama/weights.py: write → fsync → replace → fsync(dir); an adapter over
    the size cap leaves the file that was there untouched and no temporary file."""
    from combllama.core.errors import BadInputError
    from combllama.core.methods.combllama import weights
    from combllama.core.methods.combllama.modules import CombAdapter, CombConfig

    small, _ = _small_llama_and_tokenizer()
    adapter = CombAdapter.from_base(small, CombConfig.for_model(small.config, rank=2))
    path = tmp_path / "adapters" / "a.safetensors"
    calls = []
    real = {op: getattr(os, op) for op in ("write", "fsync", "replace")}
    for op in real:
        monkeypatch.setattr(os, op, lambda *a, _op=op, **k: calls.append(_op) or real[_op](*a, **k))
    size = weights.save_adapter(path, adapter, base_fingerprint="cmfp1:x", base_weights="cmw1:y", base_name="small")
    monkeypatch.undo()
    assert [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c] == ["write", "fsync", "replace", "fsync"]
    assert path.stat().st_size == size and weights.read_header(path)["base_name"] == "small"
    before = path.read_bytes()
    monkeypatch.setattr(weights, "MAX_BYTES", 1000)
    with pytest.raises(BadInputError, match="lower --rank"):
        weights.save_adapter(path, adapter, base_fingerprint="cmfp1:x", base_weights="cmw1:y", base_name="other")
    assert path.read_bytes() == before and os.listdir(path.parent) == ["a.safetensors"]
