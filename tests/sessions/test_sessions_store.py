"""Round trips of every SessionStore call, names, ids and the on-disk permissions."""
from __future__ import annotations

import json
import os
import stat
from dataclasses import FrozenInstanceError, replace

import pytest

from combllama.sessions import ids
from combllama.sessions.errors import (MemoryNotAttachedError, SessionBusyError, SessionError, SessionExistsError,
                                       SessionNameError, SessionNotFoundError, SessionValueError)
from combllama.sessions.records import MemoryRef, Session, Turn
from combllama.sessions.store import SessionStore


def test_error_exit_codes():
    assert SessionNotFoundError.exit_code == 3
    assert SessionBusyError.exit_code == 75
    assert all(issubclass(e, SessionError) for e in (SessionNotFoundError, SessionBusyError, SessionExistsError))


def test_create_get_round_trip(store):
    s = store.create("book", model="smollm2", model_fingerprint="fp1", memories=["lighthouse", ("repo", "k2")],
                     system="Be brief.", settings={"temperature": 0.2, "cite": True})
    assert isinstance(s, Session) and ids.looks_like_ulid(s.id)
    assert s.name == "book" and not s.auto_named and s.turn_count == 0
    assert s.memories == (MemoryRef("lighthouse"), MemoryRef("repo", "k2"))
    assert s.settings == {"cite": True, "temperature": 0.2}
    assert s.created_at == s.updated_at and s.created_at.endswith("Z")
    assert store.get("book") == s == store.get(s.id) == store.get(s.id.lower()) == store.get("BOOK") == store.get(s)
    with pytest.raises(FrozenInstanceError):
        s.name = "x"


def test_to_dict_is_json(store):
    s = store.create("book", model="m", memories=[MemoryRef("lh", "abc")], settings={"top_p": 0.9})
    t = store.append_turn(s, "q?", "a.", sources=[{"doc": "lh", "page_label": "iv", "pages": [4]}],
                          usage={"output_tokens": 2}, timings={"decode_ms": 1.5})
    d = json.loads(json.dumps(store.get("book").to_dict()))
    assert set(d) == {"id", "name", "auto_named", "created_at", "updated_at", "model", "model_fingerprint", "system",
                      "settings", "memories", "turn_count"}
    assert d["memories"] == [{"name": "lh", "key": "abc"}] and d["turn_count"] == 1
    td = json.loads(json.dumps(t.to_dict()))
    assert set(td) == {"id", "session_id", "seq", "question", "answer", "sources", "usage", "timings",
                       "interrupted", "created_at"}
    assert td["sources"][0]["page_label"] == "iv" and td["seq"] == 1 and td["session_id"] == s.id
    hit = store.search("q")[0].to_dict()
    assert hit["session"] == "book" and hit["turn"] == td


def test_unnamed_session_is_named_by_first_question(store):
    a = store.create()
    b = store.create()
    assert (a.name, b.name) == ("untitled", "untitled-2") and a.auto_named
    store.append_turn(a, "What's the keeper's name?", "Ada.")
    assert store.get(a.id).name == "whats-the-keepers-name" and not store.get(a.id).auto_named
    store.append_turn(b, "What's the keeper's name?", "Ada.")
    assert store.get(b.id).name == "whats-the-keepers-name-2"
    store.append_turn(a, "Something else entirely", "ok")  # only the first question names it
    assert store.get(a.id).name == "whats-the-keepers-name"
    c = store.create()
    store.append_turn(c, "???", "")
    assert store.get(c.id).name == "chat"


def test_explicit_names_are_unique_case_insensitively(store):
    store.create("Book")
    with pytest.raises(SessionExistsError):
        store.create("book")
    store.create("notes")
    with pytest.raises(SessionExistsError):
        store.rename("notes", "BOOK")
    store.rename("Book", "book")  # changing only the case of one's own name is fine
    assert store.get("BOOK").name == "book"


@pytest.mark.parametrize("bad", ["", "-x", ".hidden", "a b", "a/b", "x" * 65, "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                 "\u202eevil", "_x", "a\nb"])
def test_bad_names_are_refused(store, bad):
    with pytest.raises(SessionNameError):
        store.create(bad)
    store.create("ok")
    with pytest.raises(SessionNameError):
        store.rename("ok", bad)


def test_unicode_names(store):
    assert store.create("灯塔").name == "灯塔"
    assert store.get("灯塔").name == "灯塔"


def test_not_found(store):
    for call in (lambda: store.get("nope"), lambda: store.delete("nope"), lambda: store.turns("nope"),
                 lambda: store.append_turn("nope", "q", "a"), lambda: store.rename("nope", "x"),
                 lambda: store.clear("nope"), lambda: store.export("nope"), lambda: store.add_memory("nope", "m"),
                 lambda: store.update_settings("nope", {"a": 1}), lambda: store.get(ids.new_ulid())):
        with pytest.raises(SessionNotFoundError):
            call()


def test_append_and_turns(store):
    s = store.create("c")
    turns = [store.append_turn("c", f"q{i}", f"a{i}", interrupted=(i == 2)) for i in range(1, 6)]
    assert [t.seq for t in turns] == [1, 2, 3, 4, 5]
    assert all(isinstance(t, Turn) and t.session_id == s.id for t in turns)
    assert store.turns("c") == turns
    assert store.turns("c", limit=2) == turns[-2:]
    assert store.turns("c", limit=99) == turns
    assert store.turns("c")[1].interrupted and not store.turns("c")[0].interrupted
    assert store.get("c").turn_count == 5 and store.get("c").updated_at == turns[-1].created_at
    with pytest.raises(SessionValueError):
        store.turns("c", limit=0)


def test_turn_payloads_round_trip(store):
    store.create("c")
    sources = [{"doc": "book", "path": "a.md", "page_label": None, "pages": [1, 2], "lines": [10, 20]}]
    usage = {"question_tokens": 5, "memory_tokens": 100, "history_tokens": 0, "output_tokens": 7}
    t = store.append_turn("c", "q \u00e9\U0001f600", "a\x00b", sources=sources, usage=usage,
                          timings={"decode_tok_s": float("inf"), "prefill_ms": float("nan"), "x": [1.5]})
    back = store.turns("c")[0]
    assert back == t
    assert back.sources == sources and back.usage == usage and back.answer == "a\x00b"
    assert back.timings == {"decode_tok_s": None, "prefill_ms": None, "x": [1.5]}  # stays standard JSON
    with pytest.raises(SessionValueError):
        store.append_turn("c", "q", "a", usage={"x": object()})
    with pytest.raises(SessionValueError):
        store.append_turn("c", None, "a")
    assert store.get("c").turn_count == 1


def test_lone_surrogates_are_stored_replaced(store):
    store.create("c")
    t = store.append_turn("c", "bad \udcff byte", "ok")
    assert t.question == "bad \ufffd byte"


def test_list_latest_rename_delete(store):
    assert store.list() == [] and store.latest() is None
    a = store.create("a", memories=["m1"])
    b = store.create("b", memories=["m2", "m3"])
    store.append_turn("a", "q", "x")  # a is now the most recently updated
    listed = store.list()
    assert [s.name for s in listed] == ["a", "b"]
    assert [s.turn_count for s in listed] == [1, 0]
    assert [s.memory_names for s in listed] == [["m1"], ["m2", "m3"]]
    assert listed == [store.get("a"), store.get("b")]
    assert [s.name for s in store.list(limit=1)] == ["a"]
    assert store.latest().id == a.id
    renamed = store.rename("b", "bee")
    assert renamed.id == b.id and store.latest().id == b.id
    with pytest.raises(SessionNotFoundError):
        store.get("b")
    store.delete("a")
    assert [s.name for s in store.list()] == ["bee"]
    with pytest.raises(SessionNotFoundError):
        store.turns(a)


def test_memories_add_drop_keep_order(store):
    store.create("c", memories=["a"])
    store.add_memory("c", "b", key="kb")
    store.add_memory("c", MemoryRef("z"))
    s = store.add_memory("c", "b", key="kb2")  # re-attach: new key, same place
    assert s.memories == (MemoryRef("a"), MemoryRef("b", "kb2"), MemoryRef("z"))
    store.append_turn("c", "q", "a")
    s = store.drop_memory("c", "a")
    assert s.memory_names == ["b", "z"] and s.turn_count == 1
    with pytest.raises(MemoryNotAttachedError):
        store.drop_memory("c", "a")
    assert store.add_memory("c", "a").memory_names == ["b", "z", "a"]


def test_clear_keeps_memories_and_settings(store):
    store.create("c", memories=["book"], settings={"temperature": 0.1}, system="sys")
    for i in range(3):
        store.append_turn("c", f"q{i}", "a")
    assert store.clear("c") == 3
    s = store.get("c")
    assert s.turn_count == 0 and s.memory_names == ["book"] and s.settings == {"temperature": 0.1}
    assert s.system == "sys" and store.turns("c") == []
    assert store.append_turn("c", "again", "a").seq == 1
    assert [h.turn.question for h in store.search("q0")] == []


def test_update_settings(store):
    store.create("c", model="m1", settings={"temperature": 0.2, "cite": True})
    s = store.update_settings("c", {"temperature": 0.7, "cite": None, "top_p": 0.9}, system="new")
    assert s.settings == {"temperature": 0.7, "top_p": 0.9} and s.system == "new" and s.model == "m1"
    s = store.update_settings("c", model="m2", model_fingerprint="fp", system=None)
    assert (s.model, s.model_fingerprint, s.system) == ("m2", "fp", None) and s.settings["top_p"] == 0.9
    for bad in ({"t": float("nan")}, {"t": object()}, {1: 2}):
        with pytest.raises(SessionValueError):
            store.update_settings("c", bad)
    with pytest.raises(SessionValueError):
        store.create("d", settings={"t": float("inf")})


def test_export_md_and_json(store):
    store.create("book", model="m", memories=[MemoryRef("lh", "k")], system="Be brief.")
    store.append_turn("book", "Who keeps the light?", "Ada.", sources=[{"doc": "lh", "page_label": "12"}])
    store.append_turn("book", "Where?", "Gull Po", interrupted=True,
                      sources=[{"doc": "repo", "path": "src/a.py", "lines": [3, 9]}])
    md = store.export("book")
    assert md.startswith("# book\n") and "Who keeps the light?" in md and "lh, p. 12" in md
    assert "src/a.py:3-9" in md and "*[interrupted]*" in md and "Be brief." in md
    doc = json.loads(store.export("book", format="json"))
    assert doc["format"] == "combllama-session" and doc["version"] == 1
    assert doc["session"] == store.get("book").to_dict()
    assert [t["seq"] for t in doc["turns"]] == [1, 2] and doc["turns"][1]["interrupted"] is True
    with pytest.raises(SessionValueError):
        store.export("book", format="html")


def test_reopen_keeps_everything(db_path):
    with SessionStore(db_path) as s1:
        s = s1.create("c", memories=["m"])
        t = s1.append_turn("c", "q", "a")
    with SessionStore(db_path) as s2:
        assert s2.get("c") == replace(s, updated_at=t.created_at, turn_count=1)
        assert s2.turns("c") == [t]


def test_private_directories_and_files(tmp_path):
    path = tmp_path / "x" / "y" / "sessions.db"
    with SessionStore(path) as s:
        s.create("c")
    for d in (tmp_path / "x", tmp_path / "x" / "y"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path / "x" / "y")  # WAL files are siblings, nothing elsewhere


def test_closed_store_raises(db_path):
    s = SessionStore(db_path)
    s.close()
    with pytest.raises(SessionError):
        s.list()


def test_busy_writer_times_out_with_exit_75(db_path):
    import sqlite3

    with SessionStore(db_path, timeout=0.2) as s:
        s.create("c")
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(SessionBusyError) as e:
                s.append_turn("c", "q", "a")
            assert e.value.exit_code == 75
            assert s.get("c").turn_count == 0  # WAL: readers are not blocked by the writer
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.append_turn("c", "q", "a").seq == 1


def test_ulids_sort_by_time_and_are_unique():
    made = [ids.new_ulid() for _ in range(2000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert ids.new_ulid(now_ms=1) < ids.new_ulid(now_ms=2**47)
    assert all(ids.looks_like_ulid(u) and len(u) == 26 for u in made[:10])
    assert abs(ids.ulid_time(ids.new_ulid(now_ms=1_700_000_000_123)).timestamp() - 1_700_000_000.123) < 1e-3


@pytest.mark.parametrize("text,slug", [
    ("What's the keeper's name at Gull Point?", "whats-the-keepers-name-at-gull-point"), ("", "chat"), ("?!", "chat"),
    ("Café — résumé", "café-résumé"), ("a " * 50, "a-" * 19 + "a"), ("x" * 100, "x" * 40)])
def test_slugify(text, slug):
    assert ids.slugify(text) == slug
    assert ids.check_name(slug) is None


def test_unusable_location_is_a_clean_error(tmp_path):
    from combllama.sessions.errors import SessionDatabaseError

    (tmp_path / "file").write_text("x")
    with pytest.raises(SessionDatabaseError, match="cannot create"):
        SessionStore(tmp_path / "file" / "sessions.db")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(SessionDatabaseError):
        SessionStore(tmp_path / "dir.db")
