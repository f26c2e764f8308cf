"""`combllama ask`: from a memory by name, from a path ingested on the fly, stdout/stderr and --json."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_ask_by_name_and_by_path(tiny_dir, isolated_home, tmp_path):
    assert run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q").exit_code == 0
    r = run("ask", "lh", "Who keeps the light?", "--model", str(tiny_dir), "--max-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["memory"] == "lh" and out["usage"]["output_tokens"] <= 4 and not out["ingested"]
    assert out["usage"]["memory_tokens"] > 0 and out["timings"]["total_s"] > 0
    # A path whose content was ingested before (under any name) reuses that memory by content hash.
    r = run("ask", str(SAMPLE), "Who?", "--model", str(tiny_dir), "--max-tokens", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ingested"] is False
    assert json.loads(r.stdout)["memory"] == "lh"
    # New content is ingested on first use, under the file's name, and reused the second time.
    other = tmp_path / "lighthouse.md"
    other.write_text(SAMPLE.read_text() + "\nThe keeper's name is Ada.\n")
    r = run("ask", str(other), "Who?", "--model", str(tiny_dir), "--max-tokens", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ingested"] is True
    assert json.loads(r.stdout)["memory"] == "lighthouse"
    r = run("ask", str(other), "Who?", "--model", str(tiny_dir), "--max-tokens", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ingested"] is False
    assert json.loads(r.stdout)["memory"] == "lighthouse"
    r = run("ask", "lh", "Who?", "--model", str(tiny_dir), "--max-tokens", "3", "--stats")
    assert r.exit_code == 0 and "memory" in r.stderr and "tok/s" in r.stderr  # stats on stderr only
    assert "tok/s" not in r.stdout


def test_ask_refuses_a_memory_of_another_model(tiny_dir, tiny_dir_other):
    assert run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q").exit_code == 0
    r = run("ask", "lh", "Who?", "--model", str(tiny_dir_other), "--max-tokens", "2")
    assert r.exit_code == 5 and "another model" in r.stderr
    assert run("ask", "nope", "Who?", "--model", str(tiny_dir)).exit_code == 3


def test_ask_refuses_a_memory_larger_than_free_memory_before_reading_it(tiny_dir, isolated_home, monkeypatch):
    import combllama.core.memory.bundle as bundle
    import combllama.core.methods.base as base

    assert run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q").exit_code == 0
    monkeypatch.setattr(base, "host_available", lambda: 1024)
    reads = []
    monkeypatch.setattr(bundle, "_load_verified", lambda *a, **k: reads.append(a) or {})
    r = run("ask", "lh", "Who?", "--model", str(tiny_dir), "--max-tokens", "2")
    assert r.exit_code == 4 and "needs" in r.stderr and "GiB on cpu" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and reads == []
