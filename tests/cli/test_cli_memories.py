"""`combllama memories list|info|rm|prune` and the `info` alias."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"
DAY = 86400


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


@pytest.fixture
def three(tmp_path, tiny_dir, isolated_home):
    """Memories a, b, c; last used 50, 40 and 1 days ago."""
    for name, age in (("a", 50), ("b", 40), ("c", 1)):
        doc = tmp_path / f"{name}.txt"
        doc.write_text(f"Memory {name}: " + "the lantern is lit. " * 30 * (ord(name) - 96))
        r = run("ingest", str(doc), "--model", str(tiny_dir), "--name", name, "-q")
        assert r.exit_code == 0, r.output
        set_last_used(isolated_home / "memories" / name, time.time() - age * DAY)
    return isolated_home / "memories"


def set_last_used(root: Path, t: float) -> None:
    os.utime(root / "MANIFEST.json", (t, t))
    os.utime(root / "tokens.safetensors", (t, t))


def test_list_json_tsv_and_empty(three):
    r = run("memories", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == ["a", "b", "c"]
    a = rows[0]
    assert a["state"] == "complete" and a["method"] == "full" and a["tokens"] > 0 and a["error"] is None
    assert a["disk_bytes"] >= a["bytes"] > 0 and a["last_used"].endswith("Z")
    assert rows[0]["last_used"] < rows[1]["last_used"] < rows[2]["last_used"]
    r = run("memories", "list")  # not a terminal: tab-separated with a header
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "state", "method", "model", "tokens", "bytes", "last_used", "source"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["a", "b", "c"]
    assert all(len(ln.split("\t")) == 8 for ln in lines)


def test_list_reports_an_unreadable_memory(three):
    (three / "b" / "MANIFEST.json").write_text("{not json")
    rows = json.loads(run("memories", "list", "--json").stdout)
    bad = next(x for x in rows if x["dir"] == "b")
    assert bad["state"] == "unreadable" and bad["error"]
    r = run("memories", "prune", "--older-than", "30d", "--json")
    assert r.exit_code == 0
    assert [d["name"] for d in json.loads(r.stdout)["removed"]] == ["a"]  # b is reported, never pruned blind
    assert "b: unreadable, not pruned" in r.stderr


def test_info_and_alias_agree(three):
    one = run("info", "a", "--json")
    two = run("memories", "info", "a", "--json")
    assert one.exit_code == two.exit_code == 0
    assert json.loads(one.stdout) == json.loads(two.stdout)
    assert json.loads(one.stdout)["name"] == "a"
    assert "tokens" in run("memories", "info", "a").stdout
    assert run("memories", "info", "nope").exit_code == 3


def test_rm(three, monkeypatch):
    r = run("memories", "rm", "a")  # not a terminal: no question
    assert r.exit_code == 0 and not (three / "a").exists() and "removed a" in r.stderr
    r = run("memories", "rm", "b", "zzz", "-y")
    assert r.exit_code == 3 and (three / "b").exists()  # every name is checked before anything is removed
    from combllama.cli import memories_cmd

    monkeypatch.setattr(memories_cmd, "interactive", lambda: True)
    r = run("memories", "rm", "b", input="n\n")
    assert r.exit_code == 1 and (three / "b").exists() and "remove 1 memory(ies)" in r.stderr
    r = run("memories", "rm", "b", input="y\n")
    assert r.exit_code == 0 and not (three / "b").exists()
    r = run("memories", "rm", "c", "-y")
    assert r.exit_code == 0 and not (three / "c").exists()


def test_prune_older_than(three):
    r = run("memories", "prune", "--older-than", "30d", "--dry-run", "--json")
    out = json.loads(r.stdout)
    assert out["dry_run"] and [d["name"] for d in out["removed"]] == ["a", "b"]
    assert all(d["status"] == "would remove" for d in out["removed"])
    assert (three / "a").exists() and (three / "b").exists()
    r = run("memories", "prune", "--older-than", "45d")
    assert r.exit_code == 0 and "removed" in r.stdout
    assert not (three / "a").exists() and (three / "b").exists() and (three / "c").exists()


def test_prune_max_size_removes_least_recently_used_first(three):
    sizes = {r["name"]: r["disk_bytes"] for r in json.loads(run("memories", "list", "--json").stdout)}
    # Make b the oldest: the order follows last use, not names or creation.
    set_last_used(three / "b", time.time() - 90 * DAY)
    cap = sizes["c"] + sizes["a"]  # room for two: exactly the least recently used one must go
    r = run("memories", "prune", "--max-size", str(cap), "--json")
    removed = json.loads(r.stdout)["removed"]
    assert [d["name"] for d in removed] == ["b"] and removed[0]["reason"].startswith("over --max-size")
    r = run("memories", "prune", "--max-size", "1", "--json")  # nothing fits: all go, oldest first
    assert [d["name"] for d in json.loads(r.stdout)["removed"]] == ["a", "c"]
    assert not any((three / n).exists() for n in "abc")


def test_prune_never_removes_a_memory_being_written(three):
    from filelock import FileLock

    lock = FileLock(str(three / "a" / "LOCK"))
    with lock:
        r = run("memories", "prune", "--older-than", "30d", "--json")
    statuses = {d["name"]: d["status"] for d in json.loads(r.stdout)["removed"]}
    assert statuses == {"a": "busy", "b": "removed"}
    assert (three / "a" / "MANIFEST.json").is_file() and not (three / "b").exists()


def test_prune_arguments():
    assert run("memories", "prune").exit_code == 3
    assert run("memories", "prune", "--older-than", "soon").exit_code == 2
    assert run("memories", "prune", "--max-size", "lots").exit_code == 2
    from combllama.cli.memories_cmd import parse_age, parse_size

    assert parse_size("50GiB") == 50 * 1024 ** 3 and parse_size("1.5 GB") == 1_500_000_000
    assert parse_age("30d") == 30 * DAY and parse_age("2w") == 14 * DAY
