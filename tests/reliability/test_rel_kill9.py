"""kill -9 at random moments and inside writes (killloop.py), and what the next writer cleans up."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from killloop import kill_loop

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.errors import InterruptedError_
from combllama.core.memory.bundle import sweep_tombs
from combllama.core.methods import get_method

KILLS = 20  # the full run (harness.py) kills 200 times with the embedded SmolLM2


@pytest.mark.timeout(900)
def test_kill9_loop(tmp_path, tiny_dir):
    result = kill_loop(tmp_path / "loop", KILLS, ["--model", str(tiny_dir)], lines=40, seed=1, log=lambda *_: None)
    assert result.failures == [], "\n".join(result.failures)
    assert result.kills + result.completed_runs == KILLS
    assert result.kills >= KILLS // 2
    assert result.timed_kills >= 1 and sum(result.shim_kills.values()) >= 1
    assert result.final_equal  # --resume after all the kills = the uninterrupted run, byte for byte


def test_next_writer_cleans_orphans_and_interrupted_removals(tiny, sample_doc, store):
    config = EncodeConfig(chunk_tokens=64)
    calls = iter(range(100))
    with pytest.raises(InterruptedError_):
        ingest(tiny, sample_doc, get_method("full"), store, name="m", config=config,
               should_stop=lambda: next(calls) >= 2)
    root = store.root / "m"
    (root / "chunks" / "000099-0123456789ab.safetensors").write_bytes(b"orphan")  # written, never committed
    (root / "tmp" / ".MANIFEST.json.4242.tmp").write_bytes(b"{")
    # A removal killed between its rename and its rmtree, by a process that is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tomb = store.root / f".old.deleting.{dead}.1700000000"
    (tomb / "chunks").mkdir(parents=True)
    (tomb / "chunks" / "x").write_bytes(b"x" * 1000)
    live = store.root / f".busy.deleting.{os.getppid()}.1700000000"
    live.mkdir()  # its owner is alive: left alone
    ingest(tiny, sample_doc, get_method("full"), store, name="m", config=config, resume=True)
    assert sorted(p.name for p in (root / "chunks").iterdir()) == \
        sorted(c["file"].split("/")[1] for c in store.open("m").manifest["chunks"])
    assert list((root / "tmp").iterdir()) == []
    assert not tomb.exists() and live.exists()
    assert sweep_tombs(store.root) == []


def test_force_keeps_the_old_memory_until_the_new_one_is_sealed(tiny, sample_doc, store, tmp_path):
    from combllama import ingest as sources
    from combllama.core.memory.store import MemoryStore

    config = EncodeConfig(chunk_tokens=64)
    ingest(tiny, sample_doc, get_method("full"), store, name="m", config=config)
    old = store.open("m").manifest
    path = tmp_path / "other.txt"
    path.write_text(sample_doc.joined() + "\nA postscript changes the content.\n")
    other = sources.load(path)
    calls = iter(range(100))
    with pytest.raises(InterruptedError_, match="'m' is unchanged; run again with --force"):
        ingest(tiny, other, get_method("full"), store, name="m", config=config, force=True,
               should_stop=lambda: next(calls) >= 2)
    kept = store.open("m")
    assert kept.complete and kept.manifest == old and kept.verify() == []  # still usable, untouched
    assert store.names() == ["m"] and (store.root / ".m.replacing").is_dir()  # hidden, not listed
    # The next --force clears the leftover staging bundle and swaps the new memory in.
    result = ingest(tiny, other, get_method("full"), store, name="m", config=config, force=True)
    new = store.open("m")
    assert not result.reused and new.complete and new.manifest["content_key"] != old["content_key"]
    assert new.verify() == [] and sorted(p.name for p in store.root.iterdir()) == ["m"]

    # A kill between the swap's two renames (old renamed away, new still staged) is rolled forward by the
    # next process that opens the store.
    ingest(tiny, sample_doc, get_method("full"), store, name="m2", config=config)
    staged = store.root / ".m2.replacing"
    os.replace(store.root / "m2", staged)
    assert MemoryStore(store.root).open("m2").complete and not staged.exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["before", "after"])
def test_second_ctrl_c_during_the_manifest_commit(tmp_path, tiny_dir, isolated_home, when):
    """Case 13: a real `ingest` process is held inside its 2nd manifest commit (faults.py, before or after the
    os.replace onto MANIFEST.json) and gets two SIGINTs there: the first asks for a stop, the second raises
    KeyboardInterrupt inside the commit. It exits 130 with one line and no traceback, and the memory on disk
    is exactly the old manifest (before) or the new one (after), intact, with no temporary file left."""
    import hashlib
    import signal
    import time
    from pathlib import Path

    from killloop import ledger_text

    from combllama.core.memory.store import MemoryStore

    doc = tmp_path / "ledger.txt"
    doc.write_text(ledger_text(60))
    paused, log = tmp_path / "paused", tmp_path / "commits.log"
    here = str(Path(__file__).resolve().parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); import faults; faults.install_from_env(); "
            "from combllama.cli.main import main; main()")
    env = dict(os.environ, COMBLLAMA_TEST_PAUSE=f"2:{when}", COMBLLAMA_TEST_PAUSED=str(paused),
               COMBLLAMA_TEST_COMMIT_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-c", code, "ingest", str(doc), "--model", str(tiny_dir), "--device",
                             "cpu", "--chunk-tokens", "64", "-q", "--name", "m"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)  # the first: stop at the next chunk boundary (the commit goes on)
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # the second, inside the commit
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["combllama: error: interrupted"], err
    commits = [line.split() for line in log.read_text().splitlines()]
    intents = [sha for kind, sha in commits if kind == "intent"]
    done = [sha for kind, sha in commits if kind == "done"]
    assert len(intents) == 2 and len(done) == (1 if when == "before" else 2)
    root = isolated_home / "memories" / "m"
    on_disk = hashlib.sha256((root / "MANIFEST.json").read_bytes()).hexdigest()
    assert on_disk == (done[0] if when == "before" else intents[1])  # the old manifest, or the new one whole
    reader = MemoryStore(isolated_home / "memories").open("m")
    assert reader.verify() == [] and not reader.complete
    assert reader.manifest["ingest"]["next_seq"] == (0 if when == "before" else len(reader.manifest["chunks"]))
    assert list((root / "tmp").iterdir()) == []
