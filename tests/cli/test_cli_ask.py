"""`combllama ask`: from a memory by name, from a path ingested on the fly, stdout/stderr and --json."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_ask_by_name_and_by_path(tiny_dir, isolated_home):
    assert run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q").exit_code == 0
    r = run("ask", "lh", "Who keeps the light?", "--model", str(tiny_dir), "--max-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["memory"] == "lh" and out["usage"]["output_tokens"] <= 4 and not out["ingested"]
    assert out["usage"]["memory_tokens"] > 0 and out["timings"]["total_s"] > 0
    # A path is ingested on first use, and its memory reused by content hash the second time.
    r = run("ask", str(SAMPLE), "Who?", "--model", str(tiny_dir), "--max-tokens", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ingested"] is True
    r = run("ask", str(SAMPLE), "Who?", "--model", str(tiny_dir), "--max-tokens", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ingested"] is False
    r = run("ask", "lh", "Who?", "--model", str(tiny_dir), "--max-tokens", "3", "--stats")
    assert r.exit_code == 0 and "memory" in r.stderr and "tok/s" in r.stderr  # stats on stderr only
    assert "tok/s" not in r.stdout


def test_ask_refuses_a_memory_of_another_model(tiny_dir, tiny_dir_other):
    assert run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q").exit_code == 0
    r = run("ask", "lh", "Who?", "--model", str(tiny_dir_other), "--max-tokens", "2")
    assert r.exit_code == 5 and "another model" in r.stderr
    assert run("ask", "nope", "Who?", "--model", str(tiny_dir)).exit_code == 3
