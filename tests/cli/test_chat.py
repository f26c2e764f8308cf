"""`combllama chat` with piped stdin (CliRunner): sessions created and resumed, slash commands,
\"\"\" blocks, memories added and dropped, sources and stats on stderr, history fitted with a notice."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def store(home):
    from combllama.sessions.store import SessionStore

    return SessionStore(home / "data" / "sessions.db")


@pytest.fixture
def lh(tiny_dir):
    r = run("ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q")
    assert r.exit_code == 0, r.output
    return "lh"


def test_piped_chat_commands_and_resume(tiny_dir, lh, isolated_home):
    script = "\n".join([
        "Who keeps the lighthouse?",
        "/docs", "/tokens", "/set temperature 0.5", "/set max_tokens 3", "/set bogus 1", "/system Answer briefly.",
        '"""', "line one", "line two", '"""',
        "/retry", "/cite", "/stats", "/frobnicate", "/sessions", "/save keeper", "/exit", "not reached"]) + "\n"
    r = run("chat", "--session", "s1", "-d", lh, "--model", str(tiny_dir), "--max-tokens", "4", input=script)
    assert r.exit_code == 0, r.stderr
    st = store(isolated_home)
    s = st.get("keeper")  # renamed by /save
    assert s.memory_names == ["lh"] and s.memories[0].key
    assert s.settings["temperature"] == 0.5 and s.settings["max_tokens"] == 3 and "bogus" not in s.settings
    assert s.system == "Answer briefly."
    turns = st.turns(s)
    assert [t.question for t in turns] == ["Who keeps the lighthouse?", "line one\nline two", "line one\nline two"]
    assert turns[2].usage["retry_of"] == 2 and not any(t.interrupted for t in turns)
    assert turns[0].usage["output_tokens"] <= 4 and turns[1].usage["output_tokens"] <= 3
    assert turns[0].sources and turns[0].sources[0]["doc"] == "lh" and turns[0].sources[0]["lines"][0] >= 1
    # stdout holds the answers only; sources, stats, notices and errors go to stderr.
    assert "Sources: lighthouse.md:" in r.stderr and "tok/s" in r.stderr and "unknown command /frobnicate" in r.stderr
    assert "unknown setting 'bogus'" in r.stderr and "memory lh" in r.stderr and "free of" in r.stderr
    assert "Sources" not in r.stdout and "tok/s" not in r.stdout
    assert "not reached" not in r.stdout + r.stderr

    # -c resumes the latest session; its earlier turns are the model's history.
    r = run("chat", "-c", "--model", str(tiny_dir), input="Where is it?\n")
    assert r.exit_code == 0, r.stderr
    last = st.turns("keeper")[-1]
    assert last.seq == 4 and last.usage["history_tokens"] > 0 and last.usage["output_tokens"] <= 3


def test_no_cite_new_session_without_memory_and_path_doc(tiny_dir, isolated_home):
    r = run("chat", "--model", str(tiny_dir), "--no-cite", "--max-tokens", "2", input="hello there\n")
    assert r.exit_code == 0, r.stderr
    s = store(isolated_home).list()[0]
    assert s.name == "hello-there" and s.memory_names == [] and "Sources" not in r.stderr  # named by its question
    # A path is ingested on the fly and attached by name.
    r = run("chat", "--session", "p", "-d", str(SAMPLE), "--model", str(tiny_dir), "--max-tokens", "2", input="Who?\n")
    assert r.exit_code == 0, r.stderr
    assert store(isolated_home).get("p").memory_names == ["lighthouse"] and "Sources:" in r.stderr


def test_add_and_drop_memories(tiny_dir, lh, isolated_home, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("The harbour master is called Jonas Reed.\nHe rings the bell at noon.\n")
    script = f"/add {other}\n/docs\nWho rings the bell?\n/drop lh\n/docs\n/drop nope\n"
    r = run("chat", "--session", "two", "-d", lh, "--model", str(tiny_dir), "--max-tokens", "3", input=script)
    assert r.exit_code == 0, r.stderr
    s = store(isolated_home).get("two")
    assert s.memory_names == ["notes"]
    turn = store(isolated_home).turns("two")[0]
    assert turn.usage["memory_tokens"] > 300  # both memories were read together
    assert {src["doc"] for src in turn.sources} <= {"lh", "notes"} and turn.sources
    assert "attached 'notes'" in r.stderr and "detached 'lh'" in r.stderr and "no memory named 'nope'" in r.stderr


def test_history_that_does_not_fit_is_dropped_with_a_notice(tiny_dir, lh, isolated_home, monkeypatch):
    from combllama.core.model import LoadedModel

    st = store(isolated_home)
    s = st.create("long", memories=["lh"])
    for i in range(6):
        st.append_turn(s, f"question {i} " + "word " * 80, "answer " * 80)
    monkeypatch.setattr(LoadedModel, "window", property(lambda self: 900))  # memory ~318 + room for ~2 turns
    r = run("chat", "--session", "long", "--model", str(tiny_dir), "--max-tokens", "2", input="And now?\n")
    assert r.exit_code == 0, r.stderr
    assert "left out the" in r.stderr and "oldest turn" in r.stderr
    assert st.turns("long")[-1].usage["dropped_turns"] > 0


def test_usage_errors(tiny_dir, isolated_home):
    r = run("chat", "-c", "--model", str(tiny_dir), input="")
    assert r.exit_code == 3 and "no session to continue" in r.stderr
    assert run("chat", "-c", "--session", "x", "--model", str(tiny_dir)).exit_code == 2
    r = run("chat", "--session", "x", "-d", "missing-memory", "--model", str(tiny_dir), input="")
    assert r.exit_code == 3


def test_ask_cites_and_no_cite(tiny_dir, lh):
    r = run("ask", lh, "Who?", "--model", str(tiny_dir), "--max-tokens", "3", "--json")
    out = json.loads(r.stdout)
    first = out["sources"][0]
    assert first["label"].startswith("lighthouse.md:") and 0 < first["share"] <= 1
    r = run("ask", lh, "Who?", "--model", str(tiny_dir), "--max-tokens", "3")
    assert r.exit_code == 0 and "Sources: lighthouse.md:" in r.stderr
    r = run("ask", lh, "Who?", "--model", str(tiny_dir), "--max-tokens", "3", "--no-cite", "--json")
    assert "sources" not in json.loads(r.stdout)


def test_long_chat_folds_old_turns_into_the_session_memory(tiny_dir, isolated_home, monkeypatch):
    from combllama.core.model import LoadedModel
    from combllama.core.paths import Paths

    # A 1,100-token window leaves 332 tokens of recent history; ~45-token turns fold after about 8.
    monkeypatch.setattr(LoadedModel, "window", property(lambda self: 1100))
    script = "".join(f"Turn {i}: " + "remember " * 30 + "\n" for i in range(14)) + "/tokens\n"
    r = run("chat", "--session", "long", "--method", "combllama", "--model", str(tiny_dir), "--max-tokens", "4",
            "--no-cite", input=script)
    assert r.exit_code == 0, r.stderr
    st = store(isolated_home)
    s = st.get("long")
    assert s.settings["method"] == "combllama"
    usage = [t.usage for t in st.turns(s)]
    assert usage[-1]["folded_turns"] > 0 and all(u["dropped_turns"] == 0 for u in usage)
    assert "folded turns 1-" in r.stderr and "earlier turns:" in r.stderr
    # The default budget (a quarter of the window's full KV) holds on every turn; here it forces a compaction.
    from combllama.core.history import default_budget
    from combllama.core.model import ModelSpec, load_model

    budget = default_budget(load_model(ModelSpec(str(tiny_dir), device="cpu")))
    assert max(u["history_bytes"] for u in usage) <= budget and "compacted the session memory" in r.stderr
    folder = Paths.from_env().history(s.id)
    assert [p.name[:9] for p in folder.iterdir() if p.is_dir()] == ["c0000001-"]
    # Folds made with another adapter (the shipped one was upgraded) are folded again, not left out.
    from combllama.core.methods.combllama import method as comb

    real = comb.resolve_adapter
    monkeypatch.setattr(comb, "resolve_adapter", lambda model, spec: (real(model, spec)[0], b"\x01" * 32))
    r = run("chat", "--session", "long", "--model", str(tiny_dir), "--max-tokens", "2", input="/tokens\n")
    assert r.exit_code == 0 and "folded turns 1-" in r.stderr and "left out" not in r.stderr, r.stderr
    assert "earlier turns:" in r.stderr
    monkeypatch.setattr(comb, "resolve_adapter", real)
    # Resumed, the chat finds its folds; /clear and `sessions rm` remove them.
    r = run("chat", "--session", "long", "--model", str(tiny_dir), "--max-tokens", "2", input="/tokens\n/clear\n")
    assert "earlier turns:" in r.stderr and not folder.exists()
    r = run("chat", "--session", "long", "--model", str(tiny_dir), "--max-tokens", "2", input=script)
    assert folder.exists()
    assert run("sessions", "rm", "long").exit_code == 0 and not folder.exists()
