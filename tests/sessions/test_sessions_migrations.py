"""Migrations run once each, a newer or foreign database is refused untouched, and the FTS index
follows the SQLite build (FTS5 present or not) without losing turns."""
from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from combllama.sessions import migrations
from combllama.sessions.errors import SessionDatabaseError, SessionSchemaError
from combllama.sessions.store import SessionStore


def recorded(path):
    with closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute("SELECT name FROM _combllama_migrations ORDER BY rowid")]


def test_migrations_are_numbered_and_ordered():
    names = [name for name, _ in migrations.MIGRATIONS]
    assert names[0] == "m001_initial"
    assert [int(n[1:4]) for n in names] == list(range(1, len(names) + 1))
    assert len(set(names)) == len(names)


def test_applied_once_and_idempotent(db_path):
    SessionStore(db_path).close()
    first = recorded(db_path)
    assert first == [name for name, _ in migrations.MIGRATIONS]
    for _ in range(3):
        with SessionStore(db_path) as s:
            s.create()
    assert recorded(db_path) == first
    db = sqlite3.connect(db_path, isolation_level=None)
    assert migrations.migrate(db) == []
    assert db.execute("PRAGMA application_id").fetchone()[0] == migrations.APPLICATION_ID
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_partial_database_gets_the_missing_migrations(db_path):
    """A database left by an older combllama (only m001) is brought up to date, with its turns indexed."""
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute(f"CREATE TABLE {migrations.MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    db.execute("BEGIN")
    migrations.m001_initial(db)
    db.execute(f"INSERT INTO {migrations.MIGRATIONS_TABLE} VALUES ('m001_initial', 'then')")
    sid, tid = "01HZZZZZZZZZZZZZZZZZZZZZZZ", "01HZZZZZZZZZZZZZZZZZZZZZZY"
    db.execute("INSERT INTO sessions (id, name, created_at, updated_at) VALUES (?, 'old', 't', 't')", (sid,))
    db.execute("INSERT INTO turns (id, session_id, seq, question, answer, created_at)"
               " VALUES (?, ?, 1, 'lighthouse keeper', 'Ada', 't')", (tid, sid))
    db.execute("COMMIT")
    db.close()
    with SessionStore(db_path) as s:
        assert recorded(db_path) == [name for name, _ in migrations.MIGRATIONS]
        assert [h.session_name for h in s.search("lighthouse")] == ["old"]


def test_failed_migration_rolls_back_and_is_not_recorded(db_path, monkeypatch):
    def boom(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, ("m999_boom", boom)])
    with pytest.raises(RuntimeError):
        SessionStore(db_path)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        assert "half_done" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert "m999_boom" not in recorded(db_path)


def test_newer_schema_is_refused_untouched(db_path):
    with SessionStore(db_path) as s:
        s.create("c")
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute(f"INSERT INTO {migrations.MIGRATIONS_TABLE} VALUES ('m042_from_the_future', 'later')")
    before = db_path.read_bytes()
    with pytest.raises(SessionSchemaError) as e:
        SessionStore(db_path)
    assert "newer combllama" in str(e.value) and "m042_from_the_future" in str(e.value)
    assert e.value.exit_code == 7
    assert db_path.read_bytes() == before


def test_foreign_sqlite_database_is_refused(db_path):
    db_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("CREATE TABLE photos (x)")
    with pytest.raises(SessionSchemaError, match="not a combllama sessions database"):
        SessionStore(db_path)
    other = db_path.with_name("other.db")
    with closing(sqlite3.connect(other, isolation_level=None)) as db:
        db.execute("PRAGMA application_id = 1234")
    with pytest.raises(SessionSchemaError):
        SessionStore(other)


def test_not_a_database_is_a_clean_error(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite at all, just some text that is long enough" * 100)
    with pytest.raises(SessionDatabaseError) as e:
        SessionStore(db_path)
    assert str(db_path) in str(e.value)


def test_without_fts5_search_falls_back_and_index_is_rebuilt_later(db_path, monkeypatch):
    with SessionStore(db_path) as s:
        assert s.fts
        s.create("c")
        s.append_turn("c", "lighthouse keeper", "Ada")
    # The same file opened by a SQLite without FTS5: the sync triggers must go, or every append would fail.
    monkeypatch.setattr(migrations, "fts5_available", lambda db: False)
    with SessionStore(db_path) as s:
        assert not s.fts
        assert migrations.fts_state(s.db)[1] is False
        s.append_turn("c", "foghorn schedule", "at dusk")
        assert [h.turn.seq for h in s.search("foghorn")] == [2]
        assert [h.turn.seq for h in s.search("KEEPER")] == [1]
        assert s.search("100%_") == [] and s.search("keep%") == []  # LIKE wildcards are literal
        assert s.search("dusk")[0].snippet == "at dusk"
    monkeypatch.undo()
    with SessionStore(db_path) as s:  # FTS5 is back: the index is rebuilt and includes turn 2
        assert s.fts and migrations.fts_state(s.db) == (True, True)
        assert [h.turn.seq for h in s.search("foghorn")] == [2]
        s.db.execute("INSERT INTO turns_fts (turns_fts, rank) VALUES ('integrity-check', 1)")


def test_created_without_fts5_gets_index_when_available(db_path, monkeypatch):
    monkeypatch.setattr(migrations, "fts5_available", lambda db: False)
    with SessionStore(db_path) as s:
        s.create("c")
        s.append_turn("c", "lighthouse keeper", "Ada")
        assert migrations.fts_state(s.db) == (False, False)
        assert len(s.search("lighthouse")) == 1
    monkeypatch.undo()
    with SessionStore(db_path) as s:
        assert migrations.fts_state(s.db) == (True, True)
        assert [h.snippet for h in s.search("lighthouse")] == ["lighthouse keeper"]


def test_usable_where_the_fts_module_really_is_missing(db_path, monkeypatch):
    """Not just a flag: the index table's module is made unknown to SQLite (as in a build without FTS5),
    and appends, clear and delete still work once the store has detached the triggers."""
    with SessionStore(db_path) as s:
        s.create("c")
        s.append_turn("c", "lighthouse", "x")
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = replace(sql, 'USING fts5(', 'USING nosuchmodule(')"
                   " WHERE name = 'turns_fts'")
    monkeypatch.setattr(migrations, "fts5_available", lambda db: False)
    with SessionStore(db_path) as s:
        assert s.append_turn("c", "foghorn", "y").seq == 2
        assert [h.turn.seq for h in s.search("foghorn")] == [2]
        assert s.clear("c") == 2
        s.delete("c")
        assert s.list() == []
