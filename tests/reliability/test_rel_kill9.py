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
