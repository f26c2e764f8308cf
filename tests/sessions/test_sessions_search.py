"""Search: words match literally; no user text can become FTS5 syntax or make search raise."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from combllama.sessions.errors import SessionNotFoundError, SessionValueError
from combllama.sessions.store import SessionStore, search_terms

HOSTILE = ['"', '""', "'", "AND", "OR", "NOT", "a AND", "AND OR NOT", "*", "lig*", "^light", "(", ")", "((light",
           "light)", 'NEAR(light keeper, 2)', "NEAR", "question:light", "{question answer}: light", "-light",
           "+", ":", "\x00", "light\x00house", "\\", "%", "_", "' OR 1=1 --", "\u202e", "\ufeff", "   ", "",
           "light\"house", '"light', "light\"", "a" * 5000, " ".join(["x"] * 500), "💡", "ﬁ"]


@pytest.fixture
def filled(store):
    store.create("book")
    store.append_turn("book", "Who keeps the lighthouse at Gull Point?", "Ada Lovelace keeps it (since 1850).")
    store.append_turn("book", "When does the foghorn sound?", "At dusk, AND when fog rolls in.")
    store.create("notes")
    store.append_turn("notes", "lighthouse design", "A tall tower with a lamp.")
    return store


def test_words_match_with_session_names(filled):
    hits = filled.search("lighthouse")
    assert {(h.session_name, h.turn.seq) for h in hits} == {("book", 1), ("notes", 1)}
    assert all("lighthouse" in h.snippet.lower() for h in hits)
    assert [h.turn.seq for h in filled.search("Gull lighthouse")] == [1]  # every word, any order
    assert filled.search("lighthouse zebra") == []
    assert [h.session_name for h in filled.search("lighthouse", session="notes")] == ["notes"]
    assert len(filled.search("lighthouse", limit=1)) == 1
    assert [h.turn.seq for h in filled.search("LOVELACE")] == [1]
    assert [h.turn.seq for h in filled.search('"AND"')] == [2]  # operator words are plain words
    assert [h.turn.seq for h in filled.search("(since")] == [1]


def test_deleted_and_renamed_sessions_in_results(filled):
    filled.rename("notes", "design")
    assert {h.session_name for h in filled.search("lighthouse")} == {"book", "design"}
    filled.delete("book")
    assert [h.session_name for h in filled.search("lighthouse")] == ["design"]
    filled.db.execute("INSERT INTO turns_fts (turns_fts, rank) VALUES ('integrity-check', 1)")


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_input_never_raises(filled, text):
    hits = filled.search(text)
    assert isinstance(hits, list)


def test_bad_arguments(filled):
    with pytest.raises(SessionValueError):
        filled.search("x", limit=0)
    with pytest.raises(SessionValueError):
        filled.search(None)
    with pytest.raises(SessionNotFoundError):
        filled.search("x", session="nope")


def test_search_terms():
    assert search_terms('  a "b  NEAR( *  \x00 ') == ["a", '"b', "NEAR("]
    assert len(search_terms("w " * 100)) == 32


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(HOSTILE + ["light", "Ada"]), max_size=6).map(" ".join))
def test_any_text_never_raises(filled, text):
    filled.search(text)


@pytest.mark.parametrize("fts", [True, False])
def test_hostile_input_in_both_backends(db_path, monkeypatch, fts):
    from combllama.sessions import migrations

    if not fts:
        monkeypatch.setattr(migrations, "fts5_available", lambda db: False)
    with SessionStore(db_path) as s:
        s.create("c")
        s.append_turn("c", 'He said "light*" (AND) 100%', "x")
        assert s.fts is fts
        for text in HOSTILE:
            s.search(text)
        assert [h.turn.seq for h in s.search('"light*"')] == [1]
        assert [h.turn.seq for h in s.search("100%")] == [1]
