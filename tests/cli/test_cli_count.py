"""`combllama count`: files, skip report, exact model-token totals, memory estimates per method, no weights."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli


@pytest.fixture
def repo(tmp_path):
    """A small folder: two text files, an ignored log, a binary, a lockfile from the deny list."""
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "README.md").write_text("# Proj\n\nA tiny project about lanterns.\n")
    (root / "pkg" / "core.py").write_text("def lantern(n):\n    return n * 7\n" * 40)
    (root / "pkg" / "blob.dat").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (root / "debug.log").write_text("noise\n")
    (root / ".gitignore").write_text("*.log\n")
    (root / "poetry.lock").write_text("lock\n")
    return root


def run(*args, **kw):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, **kw)
    return result


def test_count_repo_json(repo, tiny_dir, tiny, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("count must not load model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    r = run("count", str(repo), "--model", str(tiny_dir), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    doc = out["documents"][0]
    assert doc["kind"] == "repo" and doc["files"] == 3  # README.md, pkg/core.py, .gitignore
    assert {f["path"] for f in doc["per_file"]} == {"README.md", "pkg/core.py", ".gitignore"}
    reasons = {s["path"]: s["reason"] for s in doc["skipped"]}
    assert reasons["pkg/blob.dat"] == "binary" and reasons["poetry.lock"] == "denied"
    assert "debug.log" in reasons  # ignored by .gitignore, reported, not silently dropped
    assert sum(doc["skip_summary"].values()) == len(doc["skipped"])
    # Exact: the section-wise count equals one pass of the model's tokenizer over what ingest reads.
    from combllama import ingest

    joined = ingest.load(repo).joined()
    assert doc["tokens"] == len(tiny.tokenizer(joined, add_special_tokens=False)["input_ids"])
    assert doc["tokens"] == sum(f["tokens"] for f in doc["per_file"]) + doc["tree_tokens"]
    assert doc["largest"][0]["path"] == "pkg/core.py"
    # Estimates come from every registered method; full keeps prefix + document at 2·L·H·D·4 bytes.
    from combllama.core.methods import METHODS

    assert [e["method"] for e in doc["estimates"]] == list(METHODS)
    model = out["model"]
    assert model["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 and model["kv_dtype"] == "float32"
    full = next(e for e in doc["estimates"] if e["method"] == "full")
    stored = doc["prefix_tokens"] + doc["tokens"]
    assert full["fits"] and full["memory_tokens"] == stored
    assert full["bytes"] == stored * model["kv_bytes_per_token"] + 4 * stored
    assert out["total"]["tokens"] == doc["tokens"] and out["seconds"]["total"] > 0


def test_count_text_tree_and_skips(repo, tiny_dir):
    r = run("count", str(repo), "--model", str(tiny_dir), "--tree", "--top", "1")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "proj/ (repo) · 3 file(s)" in out
    assert "skipped" in out and "binary" in out and "pkg/blob.dat" in out
    assert "largest 1 file(s):" in out and "pkg/core.py" in out
    assert "pkg/" in out.split("tree (tokens):")[1]  # the folder row of the tree
    assert "memory estimate:" in out and "full" in out and "truncate" in out
    assert "tokenizing" in r.stderr and "B/token" in r.stderr  # progress and stats go to stderr
    assert "tokenizing" not in out


def test_count_include_exclude_and_many_paths(repo, tiny_dir, sample_doc):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"
    r = run("count", str(repo), str(sample), "--exclude", "*.md", "--model", str(tiny_dir), "--json", "-q")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    first, second = out["documents"]
    assert any(s["path"] == "README.md" and s["reason"] == "excluded" for s in first["skipped"])
    assert second["kind"] == "markdown" and second["files"] == 1  # patterns apply to folders only
    assert out["total"]["files"] == first["files"] + 1
    assert out["total"]["tokens"] == first["tokens"] + second["tokens"]
    assert r.stderr.count("apply to folders") == 1
    r = run("count", str(repo), "--include", "pkg/", "--model", str(tiny_dir), "--json", "-q")
    doc = json.loads(r.stdout)["documents"][0]
    assert [f["path"] for f in doc["per_file"]] == ["pkg/core.py"]


def test_count_budget_shapes_estimates(sample_doc, tiny_dir):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"
    r = run("count", str(sample), "--budget", "64", "--model", str(tiny_dir), "--json", "-q")
    est = {e["method"]: e for e in json.loads(r.stdout)["documents"][0]["estimates"]}
    assert not est["full"]["fits"] and "budget" in est["full"]["note"]
    assert est["truncate"]["fits"] and est["truncate"]["memory_tokens"] < 200


def test_count_embedded_model_uses_its_tokenizer(smollm2):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"
    r = run("count", str(sample), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"]["name"] == "smollm2-135m-instruct"
    assert out["model"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
    from combllama import ingest

    text = ingest.load(sample).joined()
    assert out["documents"][0]["tokens"] == len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_count_errors(tmp_path, tiny_dir):
    r = CliRunner().invoke(cli, ["count", str(tmp_path / "missing")])
    assert r.exit_code == 2  # click: the path does not exist
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["count", str(tmp_path / "empty"), "--model", str(tiny_dir)])
    assert r.exit_code == 3 and "no readable text files" in r.stderr
    r = CliRunner().invoke(cli, ["count", str(tmp_path / "empty"), "--model", str(tmp_path)])
    assert r.exit_code == 3 and "config.json" in r.stderr


def test_count_folder_ignored_by_an_enclosing_repository(tmp_path, tiny_dir):
    """A folder the user names is read even when an enclosing git work tree ignores it (pyenv's
    versions/ holds the standard library under a .gitignore'd path)."""
    import subprocess

    outer = tmp_path / "outer"
    inner = outer / "versions" / "lib"
    inner.mkdir(parents=True)
    (outer / ".gitignore").write_text("/versions\n")
    (inner / "os.py").write_text("import sys\n" * 10)
    (inner / "notes.log").write_text("kept: no .gitignore inside the folder says otherwise\n")
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    r = run("count", str(inner), "--model", str(tiny_dir), "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)["documents"][0]
    assert sorted(f["path"] for f in doc["per_file"]) == ["notes.log", "os.py"]
