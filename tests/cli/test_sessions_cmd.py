"""`combllama sessions list|show|rename|rm|export|search`: TSV when piped, --json shapes, errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def filled(isolated_home):
    from combllama.sessions.store import SessionStore

    st = SessionStore(isolated_home / "data" / "sessions.db")
    a = st.create("book", model="smol", memories=[("lh", "k1")])
    st.append_turn(a, "Who keeps the lighthouse?", "Ada Brightwater keeps it.",
                   sources=[{"doc": "lh", "path": "lighthouse.md", "lines": [7, 12], "label": "lighthouse.md:7-12",
                             "share": 0.8}], usage={"output_tokens": 5})
    st.append_turn(a, "And her cat?", "Pepper, a \x1b[31mgrey\x1b[0m cat.", interrupted=True)
    st.create("notes")
    return st


def test_list_tsv_and_json(filled):
    r = run("sessions", "list")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["NAME", "ID", "DOCS", "TURNS", "MODEL", "UPDATED"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows["book"][2:5] == ["lh", "2", "smol"] and rows["notes"][2:5] == ["-", "0", "-"]
    data = json.loads(run("sessions", "list", "--json").stdout)
    assert {s["name"] for s in data} == {"book", "notes"}
    book = next(s for s in data if s["name"] == "book")
    assert book["memories"] == [{"name": "lh", "key": "k1"}] and book["turn_count"] == 2
    assert len(json.loads(run("sessions", "list", "--json", "-n", "1").stdout)) == 1


def test_show_text_and_json(filled):
    r = run("sessions", "show", "book")
    assert r.exit_code == 0 and "Who keeps the lighthouse?" in r.stdout and "Sources: lighthouse.md:7-12" in r.stdout
    data = json.loads(run("sessions", "show", "book", "--json").stdout)
    assert data["session"]["name"] == "book" and [t["seq"] for t in data["turns"]] == [1, 2]
    assert data["turns"][1]["interrupted"] is True and data["turns"][0]["sources"][0]["share"] == 0.8
    r = run("sessions", "show", "nope")
    assert r.exit_code == 3 and "no session named 'nope'" in r.stderr


def test_rename_rm(filled):
    assert run("sessions", "rename", "book", "novel").exit_code == 0
    assert filled.get("novel").turn_count == 2
    r = run("sessions", "rename", "novel", "notes")
    assert r.exit_code == 3 and "already exists" in r.stderr
    r = run("sessions", "rm", "novel", "notes")
    assert r.exit_code == 0 and "removed session 'novel' (2 turns)" in r.stderr
    assert filled.list() == []
    assert run("sessions", "rm", "novel").exit_code == 3


def test_export_md_json_and_file(filled, tmp_path):
    r = run("sessions", "export", "book")
    assert r.exit_code == 0 and r.stdout.startswith("# book") and "*[interrupted]*" in r.stdout
    data = json.loads(run("sessions", "export", "book", "--format", "json").stdout)
    assert data["format"] == "combllama-session" and len(data["turns"]) == 2
    out = tmp_path / "book.md"
    assert run("sessions", "export", "book", "-o", str(out)).exit_code == 0
    assert out.read_text().startswith("# book")


def test_search(filled):
    r = run("sessions", "search", "lighthouse", "keeps")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["SESSION", "TURN", "CREATED", "SNIPPET"] and lines[1].startswith("book\t1\t")
    hits = json.loads(run("sessions", "search", "Pepper", "--json").stdout)
    assert [h["turn"]["seq"] for h in hits] == [2] and hits[0]["session"] == "book"
    assert json.loads(run("sessions", "search", "Pepper", "--session", "notes", "--json").stdout) == []
    assert "JSON (--json" in run("sessions", "--help").stdout  # the schema is documented in the help


def test_terminal_output_is_neutralised(filled, monkeypatch):
    """On a terminal, text from the transcript cannot carry escape sequences."""
    import sys

    from combllama.cli import sessions_cmd

    printed = []
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "write", lambda s: printed.append(s), raising=False)
    sessions_cmd.show.callback("book", False)
    text = "".join(printed)
    assert "\x1b" not in text and "^[[31mgrey" in text
