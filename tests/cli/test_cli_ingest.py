"""`combllama ingest`: every source, the skip report, --password-stdin, --include/--exclude, summary and --json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def manifest(home: Path, name: str) -> dict:
    return json.loads((home / "memories" / name / "MANIFEST.json").read_text())


def test_ingest_text_json(tiny_dir, isolated_home):
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["name"] == "lh" and out["files"] == 1 and out["skipped"] == [] and out["skip_summary"] == {}
    assert out["memory"]["tokens"] > 0 and out["memory"]["bytes_per_token"] > 0
    assert out["wall_seconds"] >= out["seconds"] > 0
    assert (isolated_home / "memories" / "lh" / "MANIFEST.json").is_file()
    again = json.loads(run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "--json").stdout)
    assert again["reused"] and again["tokens_encoded"] == 0


def test_ingest_summary_on_stderr_only(tiny_dir):
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # an ingest answers nothing: everything it says is on stderr
    assert "sealed 'lh'" in r.stderr and "B/token" in r.stderr
    assert "1 file(s) read · 0 skipped · wall" in r.stderr
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


def test_ingest_repo_skip_report_and_patterns(tmp_path, tiny_dir):
    root = tmp_path / "proj"
    (root / "docs").mkdir(parents=True)
    (root / "main.py").write_text("print('lantern')\n" * 5)
    (root / "docs" / "guide.md").write_text("# Guide\n\nLight the lantern at dusk.\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (root / "data.bin").write_bytes(b"\x00\xff" * 100)
    r = run("ingest", str(root), "--model", str(tiny_dir), "--exclude", "docs/", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["files"] == 1
    by_path = {s["path"]: s for s in out["skipped"]}
    assert by_path["docs/guide.md"]["reason"] == "excluded"
    assert by_path["data.bin"]["reason"] == "binary" and "logo.png" in by_path
    assert sum(out["skip_summary"].values()) == len(out["skipped"]) == 3
    r = run("ingest", str(root), "--model", str(tiny_dir), "--include", "*.md", "--name", "docs")
    assert r.exit_code == 0, r.output
    assert "1 file(s) read · 3 skipped (" in r.stderr and "excluded 1" in r.stderr


def _make_pdf():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ingest"))
    try:
        from builders import make_pdf
    finally:
        sys.path.pop(0)
    return make_pdf


def test_ingest_pdf_password_stdin(tmp_path, tiny_dir):
    pdf = _make_pdf()(tmp_path / "locked.pdf", [["The keeper lights the lamp at dusk."], ["Second page."]],
                      user_password="hunter2")
    r = run("ingest", str(pdf), "--model", str(tiny_dir))
    assert r.exit_code == 3 and "--password-stdin" in r.stderr
    r = run("ingest", str(pdf), "--model", str(tiny_dir), "--password-stdin", input="wrong\n")
    assert r.exit_code == 3 and "password" in r.stderr
    r = run("ingest", str(pdf), "--model", str(tiny_dir), "--password-stdin", "--json", input="hunter2\n")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["memory"]["kind"] == "pdf" and out["memory"]["tokens"] > 0


def test_ingest_errors_keep_their_exit_codes(tmp_path, tiny_dir):
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh")
    assert r.exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text("Different content entirely.\n")
    r = run("ingest", str(other), "--model", str(tiny_dir), "--name", "lh")
    assert r.exit_code == 3 and "already exists" in r.stderr
    r = run("ingest", str(other), "--model", str(tiny_dir), "--name", "lh", "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["memory"]["source"] == "other.txt"
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--method", "nope")
    assert r.exit_code == 3 and "unknown method" in r.stderr
    (tmp_path / "blob").write_bytes(b"\x00\x01" * 100)
    r = run("ingest", str(tmp_path / "blob"), "--model", str(tiny_dir))
    assert r.exit_code == 3


def test_chunk_tokens_from_env_config_and_flag(tiny_dir, isolated_home, monkeypatch):
    """flag > COMBLLAMA_INGEST_CHUNK_TOKENS > config.toml [ingest] > [default] > built-in 512."""
    (isolated_home / "config").mkdir(parents=True)
    (isolated_home / "config" / "config.toml").write_text(
        f'[default]\nmodel = "{tiny_dir}"\n\n[ingest]\nchunk-tokens = 48\n')
    chunking = lambda name: manifest(isolated_home, name)["chunking"]["chunk_tokens"]  # noqa: E731
    assert run("ingest", str(SAMPLE), "--name", "a").exit_code == 0  # model from [default]
    assert chunking("a") == 48
    monkeypatch.setenv("COMBLLAMA_INGEST_CHUNK_TOKENS", "40")
    assert run("ingest", str(SAMPLE), "--name", "b").exit_code == 0
    assert chunking("b") == 40
    assert run("ingest", str(SAMPLE), "--name", "c", "--chunk-tokens", "32").exit_code == 0
    assert chunking("c") == 32
    assert manifest(isolated_home, "c")["model"]["name"] == tiny_dir.name


def test_a_second_writer_of_the_same_memory_exits_75_and_writes_nothing(tiny_dir, isolated_home):
    """Two ingests into one memory: the second finds the first's lock (held here), waits its lock timeout,
    then exits 75 with one line, leaving the bundle as it was."""
    from filelock import FileLock

    root = isolated_home / "memories" / "m"
    root.mkdir(parents=True)
    with FileLock(str(root / "LOCK")):
        r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "m", "-q")
    assert r.exit_code == 75 and "another combllama process is writing" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == ["LOCK"]


def test_the_embedded_model_defaults_to_combllama_and_others_to_full(smollm2, tiny_dir, isolated_home):
    """No --method: CombLlama for the embedded SmolLM2 (its adapter ships), `full` for another model; the
    chat that follows reads the CombLlama memory with no flags either."""
    r = run("ingest", str(SAMPLE), "--device", "cpu", "--name", "book", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["memory"]["method"] == "combllama"
    assert manifest(isolated_home, "book")["method"]["params"]["adapter"] == "auto"
    r = run("chat", "--session", "s", "-d", "book", "--device", "cpu", "--max-tokens", "3", "--no-cite",
            input="Who keeps the lighthouse?\n")
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "tiny", "--json")
    assert json.loads(r.stdout)["memory"]["method"] == "full"
    r = run("ingest", str(SAMPLE), "--device", "cpu", "--name", "exact", "--method", "full", "--json")
    assert json.loads(r.stdout)["memory"]["method"] == "full"
