"""The sessions database schema as ordered, numbered migrations (after simonw/llm's migrations.py).

Each migration runs once, in its own `BEGIN IMMEDIATE` transaction, and is recorded by name in
`_combllama_migrations` in that same transaction: a crash leaves it either applied and recorded or
neither. Never edit or renumber a migration that has shipped; add the next one. A database that records
a migration this code does not know was written by a newer combllama and is refused before anything
is read or written.

The FTS5 index over turns is derived data: `ensure_fts` (re)builds or detaches it depending on whether
this SQLite has FTS5, so a database moves between builds with and without it. Knows nothing of records.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .errors import SessionSchemaError
from .ids import utc_now

MIGRATIONS_TABLE = "_combllama_migrations"
# PRAGMA application_id marks the file as ours ("CmLs"), so `file` and we can tell it from other SQLite files.
APPLICATION_ID = 0x436D4C73

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("""
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL COLLATE NOCASE UNIQUE,
            auto_named INTEGER NOT NULL DEFAULT 0 CHECK (auto_named IN (0, 1)),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model TEXT,
            model_fingerprint TEXT,
            system TEXT,
            settings TEXT NOT NULL DEFAULT '{}'
        )""")
    db.execute("CREATE INDEX sessions_updated ON sessions (updated_at)")
    db.execute("""
        CREATE TABLE session_memories (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            content_key TEXT,
            added_at TEXT NOT NULL,
            PRIMARY KEY (session_id, name)
        )""")
    # pk is an explicit INTEGER PRIMARY KEY because the FTS index refers to turns by rowid, and VACUUM
    # may renumber an implicit rowid.
    db.execute("""
        CREATE TABLE turns (
            pk INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL CHECK (seq >= 1),
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            sources TEXT NOT NULL DEFAULT '[]',
            usage TEXT NOT NULL DEFAULT '{}',
            timings TEXT NOT NULL DEFAULT '{}',
            interrupted INTEGER NOT NULL DEFAULT 0 CHECK (interrupted IN (0, 1)),
            created_at TEXT NOT NULL,
            UNIQUE (session_id, seq)
        )""")


@migration
def m002_turns_fts(db: sqlite3.Connection) -> None:
    ensure_fts(db, fts5_available(db))


# ---------------------------------------------------------------------------------------------- FTS

_FTS_TRIGGERS = {
    "turns_fts_ai": """CREATE TRIGGER turns_fts_ai AFTER INSERT ON turns BEGIN
        INSERT INTO turns_fts (rowid, question, answer) VALUES (new.pk, new.question, new.answer); END""",
    "turns_fts_ad": """CREATE TRIGGER turns_fts_ad AFTER DELETE ON turns BEGIN
        INSERT INTO turns_fts (turns_fts, rowid, question, answer)
        VALUES ('delete', old.pk, old.question, old.answer); END""",
    "turns_fts_au": """CREATE TRIGGER turns_fts_au AFTER UPDATE ON turns BEGIN
        INSERT INTO turns_fts (turns_fts, rowid, question, answer)
        VALUES ('delete', old.pk, old.question, old.answer);
        INSERT INTO turns_fts (rowid, question, answer) VALUES (new.pk, new.question, new.answer); END""",
}


def fts5_available(db: sqlite3.Connection) -> bool:
    """Whether this SQLite build has FTS5 (probed, not guessed from the version)."""
    try:
        db.execute("CREATE VIRTUAL TABLE temp._combllama_fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp._combllama_fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False


def _objects(db: sqlite3.Connection, kind: str) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))}


def fts_state(db: sqlite3.Connection) -> tuple[bool, bool]:
    """(index table exists, all sync triggers exist)."""
    return "turns_fts" in _objects(db, "table"), set(_FTS_TRIGGERS) <= _objects(db, "trigger")


def fts_needs_repair(db: sqlite3.Connection, available: bool) -> bool:
    """Whether `ensure_fts` has work to do (checked outside a transaction, so opening takes no write lock)."""
    table, triggers = fts_state(db)
    if available:
        return not (table and triggers)
    return bool(set(_FTS_TRIGGERS) & _objects(db, "trigger"))


def ensure_fts(db: sqlite3.Connection, available: bool) -> None:
    """Make the FTS index match this SQLite build; call inside a write transaction.

    With FTS5: create the index and its triggers if missing, and rebuild it from `turns` whenever the
    triggers were missing (turns written meanwhile are not in it). Without FTS5: drop the triggers, since
    a trigger writing to an fts5 table would make every append fail with "no such module"; the stale
    table is left alone (dropping it needs the module too) and search falls back to LIKE.
    """
    table, triggers = fts_state(db)
    if not available:
        for name in _FTS_TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
        return
    if table and triggers:
        return
    if not table:
        db.execute("""CREATE VIRTUAL TABLE turns_fts USING fts5(
            question, answer, content='turns', content_rowid='pk', tokenize='unicode61 remove_diacritics 2')""")
    existing = _objects(db, "trigger")
    for name, sql in _FTS_TRIGGERS.items():
        if name not in existing:
            db.execute(sql)
    db.execute("INSERT INTO turns_fts (turns_fts) VALUES ('rebuild')")


# ------------------------------------------------------------------------------------------- apply

def applied(db: sqlite3.Connection) -> list[str]:
    if MIGRATIONS_TABLE not in _objects(db, "table"):
        return []
    return [r[0] for r in db.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY rowid")]


def check_compatible(db: sqlite3.Connection, where: str = "") -> list[str]:
    """The migrations recorded in `db`; raises SessionSchemaError for a newer or foreign database."""
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    tables = _objects(db, "table")
    if app_id not in (0, APPLICATION_ID) or (MIGRATIONS_TABLE not in tables and tables - {"sqlite_sequence"}):
        raise SessionSchemaError(f"{where or 'database'} is not a combllama sessions database")
    done = applied(db)
    known = {name for name, _ in MIGRATIONS}
    unknown = [name for name in done if name not in known]
    if unknown:
        raise SessionSchemaError(
            f"{where or 'database'} was written by a newer combllama (unknown schema migration "
            f"{', '.join(unknown)}); upgrade combllama or use another sessions database")
    return done


def migrate(db: sqlite3.Connection, where: str = "") -> list[str]:
    """Apply every migration not yet recorded, one transaction each; return the names applied now.

    Safe against another process migrating at the same time: each step re-reads the record under the
    write lock, so a migration is never applied twice.
    """
    if db.in_transaction:
        raise RuntimeError("migrate() needs a connection outside a transaction")
    done = set(check_compatible(db, where))
    if len(done) == len(MIGRATIONS):
        return []
    ran = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}"
                       " (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            if name not in check_compatible(db, where):
                fn(db)
                db.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)", (name, utc_now()))
                ran.append(name)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # some errors (disk full) have rolled back already
                db.execute("ROLLBACK")
            raise
    return ran
