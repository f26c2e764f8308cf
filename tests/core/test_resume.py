"""kill -9 in the middle of an ingest, then --resume: the memory opens to the last committed state,
orphans are cleaned, no committed chunk is encoded again, and the result equals an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from combllama.cli.main import cli
from combllama.core.memory.store import MemoryStore

TEXT = "\n".join(f"Entry {i}: the ledger records {i * 37 % 1000} barrels of {['oil', 'salt', 'tea'][i % 3]} "
                 f"shipped to harbour {i % 17} on day {i % 365}." for i in range(400))


def _cmd(*args):
    return [sys.executable, "-c", "from combllama.cli.main import main; main()", *args]


def _wait_for_commits(manifest, n: int, timeout: float = 120) -> None:
    """Until the ingest writing `manifest` has committed `n` chunks (or `timeout` passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(manifest.read_text())["ingest"]["next_seq"] >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)


def _chunks(home, name):
    reader = MemoryStore(home / "memories").open(name)
    return reader, [(rec, tensors) for rec, tensors in reader.chunks()]


@pytest.mark.timeout(300)
def test_kill9_then_resume_equals_uninterrupted(tmp_path, tiny_dir, isolated_home):
    doc = tmp_path / "ledger.txt"
    doc.write_text(TEXT)
    args = ["ingest", str(doc), "--model", str(tiny_dir), "--device", "cpu", "--chunk-tokens", "128", "-q"]
    env = dict(os.environ)
    proc = subprocess.Popen(_cmd(*args, "--name", "killed"), env=env)
    _wait_for_commits(isolated_home / "memories" / "killed" / "MANIFEST.json", 4)  # then kill -9 mid-flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    reader = MemoryStore(isolated_home / "memories").open("killed")
    assert not reader.complete, "the ingest finished before the kill; make the document longer"
    committed = reader.manifest["ingest"]["next_seq"]
    assert reader.verify() == []  # the last committed state is intact

    # A plain re-run refuses to mix; --resume continues where the commit left off.
    again = subprocess.run(_cmd(*args, "--name", "killed"), env=env, capture_output=True, text=True)
    assert again.returncode == 3 and "--resume" in again.stderr
    done = subprocess.run(_cmd(*args, "--name", "killed", "--resume", "--json"), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["resumed"] is True
    total = out["memory"]["tokens"]
    first_resumed = reader.manifest["chunks"][committed - 1]["end"] if committed else 0
    assert out["tokens_encoded"] == total - first_resumed  # committed chunks were not encoded again

    ref = subprocess.run(_cmd(*args, "--name", "reference"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    resumed, a = _chunks(isolated_home, "killed")
    _, b = _chunks(isolated_home, "reference")
    assert resumed.complete and len(a) == len(b)
    for (ra, ta), (rb, tb) in zip(a, b):
        assert (ra["start"], ra["end"]) == (rb["start"], rb["end"])
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-5)
    chunk_files = {p.name for p in (isolated_home / "memories" / "killed" / "chunks").iterdir()}
    assert chunk_files == {r["file"].split("/")[1] for r, _ in a if r["file"]}  # no orphans left
    assert not any((isolated_home / "memories" / "killed" / "tmp").iterdir())


def test_resume_refuses_a_changed_source(tmp_path, tiny_dir, isolated_home):
    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.errors import InterruptedError_
    from combllama.core.methods import get_method
    from combllama.core.model import ModelSpec, load_model
    from combllama import ingest as sources

    doc = tmp_path / "ledger.txt"
    doc.write_text(TEXT[:20000])
    loaded = load_model(ModelSpec(str(tiny_dir), device="cpu"))
    store = MemoryStore(isolated_home / "memories")
    calls = iter(range(100))
    with pytest.raises(InterruptedError_, match="--resume"):  # Ctrl-C after 3 chunks
        ingest(loaded, sources.load(doc), get_method("full"), store, name="m",
               config=EncodeConfig(chunk_tokens=64), should_stop=lambda: next(calls) >= 3)
    assert store.open("m").manifest["ingest"]["next_seq"] == 3
    doc.write_text(TEXT[:20000].replace("barrels", "casks"))
    result = CliRunner().invoke(cli, ["ingest", str(doc), "--name", "m", "--resume", "--model", str(tiny_dir),
                                      "--chunk-tokens", "128", "-q"])
    assert result.exit_code == 3, result.output
    assert "interrupted ingest" in result.output


@pytest.mark.timeout(300)
def test_ctrl_c_during_ingest_saves_what_is_committed_and_resume_finishes(tmp_path, tiny_dir, isolated_home):
    """Reliability case 12: SIGINT (Ctrl-C) mid-ingest exits 130 promptly with one line saying how many
    chunks are saved and how to resume; the chunk in flight is not committed; --resume completes."""
    doc = tmp_path / "ledger.txt"
    doc.write_text(TEXT)
    args = ["ingest", str(doc), "--model", str(tiny_dir), "--device", "cpu", "--chunk-tokens", "128", "-q",
            "--name", "cut"]
    # The default SIGINT disposition a terminal user has (a background test run inherits it ignored).
    proc = subprocess.Popen(_cmd(*args), env=dict(os.environ), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_commits(isolated_home / "memories" / "cut" / "MANIFEST.json", 2)
    proc.send_signal(signal.SIGINT)
    t = time.time()
    _, err = proc.communicate(timeout=60)
    stopped_in = time.time() - t
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted:" in lines[0] and "--resume" in lines[0], err
    assert stopped_in < 15  # one chunk of a tiny model, even on a loaded machine
    reader = MemoryStore(isolated_home / "memories").open("cut")
    assert not reader.complete and reader.verify() == []
    saved = reader.manifest["ingest"]["next_seq"]
    assert f"{saved}/" in lines[0]  # the message counts what the manifest holds
    done = subprocess.run(_cmd(*args, "--resume"), env=dict(os.environ), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert MemoryStore(isolated_home / "memories").open("cut").complete
