"""SessionStore: named chat sessions and their turns in one SQLite file (WAL, stdlib sqlite3).

Every write is one short `BEGIN IMMEDIATE` transaction, so several processes may share a database: two
chats appending to one session never lose or duplicate a turn and `seq` stays 1..n. A writer that
cannot get the lock within `timeout` seconds raises SessionBusyError (exit 75).

The store keeps transcripts and *references* to memories (name + content key); it never opens, reads or
modifies a memory, and knows nothing of models, tokens or the CLI. Stdlib only.
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import migrations
from .errors import (MemoryNotAttachedError, SessionBusyError, SessionDatabaseError, SessionDiskFullError,
                     SessionError, SessionExistsError, SessionNameError, SessionNotFoundError, SessionValueError)
from .ids import check_name, looks_like_ulid, new_ulid, slugify, utc_now, with_suffix
from .records import MemoryRef, SearchHit, Session, Turn

PLACEHOLDER_NAME = "untitled"
MAX_SEARCH_TERMS = 32
_UNSET: Any = object()


def _wal(db: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode. Switching the journal mode while another connection switches it (several
    processes opening a fresh database together) fails with "database is locked" at once — SQLite does not
    call the busy handler for it — so wait here, up to the store's timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class SessionStore:
    """A sessions database. Not thread-safe: one store per thread (processes may share the file)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.path = Path(path).expanduser()
        self.timeout = timeout
        try:
            _private_dirs(self.path.parent)
            _private_file(self.path)
        except OSError as e:
            raise SessionDatabaseError(f"{self.path}: cannot create the sessions database: {e.strerror or e}") from e
        self._db: sqlite3.Connection | None = None
        with self._translate():
            # isolation_level=None: no implicit transactions; every transaction below is explicit.
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._db = db
            try:
                db.execute(f"PRAGMA busy_timeout = {max(0, int(timeout * 1000))}")
                db.execute("PRAGMA foreign_keys = ON")
                # Refuse a newer or foreign database before anything (even the journal mode) changes in it.
                migrations.check_compatible(db, str(self.path))
                _wal(db, timeout)
                # FULL: a turn reported saved survives power loss (WAL's NORMAL may drop the last commits).
                db.execute("PRAGMA synchronous = FULL")
                migrations.migrate(db, str(self.path))
                self.fts = migrations.fts5_available(db)
                if migrations.fts_needs_repair(db, self.fts):
                    with self._write():
                        migrations.ensure_fts(db, self.fts)
            except BaseException:
                db.close()
                self._db = None
                raise

    # ------------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SessionError(f"{self.path}: the sessions store is closed")
        return self._db

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """sqlite3 errors → SessionError types with the path, so the CLI prints one clear line."""
        try:
            yield
        except SessionError:
            raise
        except sqlite3.OperationalError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise SessionBusyError(
                    f"{self.path}: sessions database busy for more than {self.timeout:g}s "
                    "(another combllama is writing); try again") from e
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in msg:
                raise SessionDiskFullError(f"{self.path}: disk full: {msg}; free some space and try again") from e
            raise SessionDatabaseError(f"{self.path}: {msg}") from e
        except sqlite3.DatabaseError as e:
            raise SessionDatabaseError(f"{self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; IMMEDIATE takes the write lock up front, so the read-then-write
        inside (next seq, unique name) cannot race another process."""
        db = self.db
        with self._translate():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one snapshot (a session and its turn count agree)."""
        db = self.db
        with self._translate():
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")

    # ----------------------------------------------------------------------------------- sessions

    def create(self, name: str | None = None, *, model: str | None = None, model_fingerprint: str | None = None,
               memories: Iterable[MemoryRef | str | tuple[str, str | None]] = (), system: str | None = None,
               settings: Mapping[str, Any] | None = None) -> Session:
        """A new session. Without a name it is called "untitled" (made unique) until its first question
        names it. Raises SessionExistsError if `name` is taken, SessionNameError if it is not a name."""
        if name is not None:
            _require_name(name)
        refs = _memory_refs(memories)
        settings_json = _dump_settings(dict(settings or {}))
        with self._write() as db:
            if name is not None and _row(db, "SELECT 1 FROM sessions WHERE name = ?", name):
                raise SessionExistsError(f"a session named {name!r} already exists")
            final = name if name is not None else _unique_name(db, PLACEHOLDER_NAME)
            sid, now = new_ulid(), utc_now()
            db.execute(
                "INSERT INTO sessions (id, name, auto_named, created_at, updated_at, model, model_fingerprint,"
                " system, settings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, final, int(name is None), now, now, _opt_text(model), _opt_text(model_fingerprint),
                 _opt_text(system), settings_json))
            for pos, ref in enumerate(refs, 1):
                db.execute("INSERT INTO session_memories (session_id, position, name, content_key, added_at)"
                           " VALUES (?, ?, ?, ?, ?)", (sid, pos, ref.name, ref.key, now))
            return _load(db, sid)

    def get(self, session: str | Session) -> Session:
        """The session of that name (case-insensitive) or id. Raises SessionNotFoundError."""
        with self._read() as db:
            return _load(db, _resolve(db, session))

    def exists(self, session: str | Session) -> bool:
        try:
            self.get(session)
            return True
        except SessionNotFoundError:
            return False

    def latest(self) -> Session | None:
        """The most recently updated session (what `chat -c` resumes), or None if there is none."""
        with self._read() as db:
            row = _row(db, "SELECT id FROM sessions ORDER BY updated_at DESC, id DESC LIMIT 1")
            return _load(db, row[0]) if row else None

    def list(self, limit: int | None = None) -> list[Session]:
        """Sessions, most recently updated first, with their turn counts and memories."""
        n = -1 if limit is None else _positive(limit, "limit")
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_SESSION_COLS}, (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id)"
                " FROM sessions s ORDER BY updated_at DESC, id DESC LIMIT ?", (n,)).fetchall()
            mems: dict[str, list[MemoryRef]] = {}
            for sid, mname, key in db.execute(
                    "SELECT session_id, name, content_key FROM session_memories WHERE session_id IN"
                    " (SELECT id FROM sessions ORDER BY updated_at DESC, id DESC LIMIT ?)"
                    " ORDER BY session_id, position", (n,)):
                mems.setdefault(sid, []).append(MemoryRef(mname, key))
            return [_session(r[:-1], mems.get(r[0], []), r[-1]) for r in rows]

    def rename(self, session: str | Session, new: str) -> Session:
        """Give a session a new name (it keeps it: the first question no longer renames it)."""
        _require_name(new)
        with self._write() as db:
            sid = _resolve(db, session)
            other = _row(db, "SELECT id FROM sessions WHERE name = ?", new)
            if other and other[0] != sid:
                raise SessionExistsError(f"a session named {new!r} already exists")
            db.execute("UPDATE sessions SET name = ?, auto_named = 0, updated_at = ? WHERE id = ?",
                       (new, utc_now(), sid))
            return _load(db, sid)

    def delete(self, session: str | Session) -> None:
        """Delete a session with its turns and memory references (never the memories themselves)."""
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (_resolve(db, session),))

    def update_settings(self, session: str | Session, settings: Mapping[str, Any] | None = None, *,
                        system: str | None = _UNSET, model: str | None = _UNSET,
                        model_fingerprint: str | None = _UNSET) -> Session:
        """Merge `settings` into the session's (a key set to None is removed); set system/model if given
        (None clears them)."""
        changes = dict(settings or {})
        _dump_settings(changes)  # validate before taking the lock
        with self._write() as db:
            sid = _resolve(db, session)
            merged = json.loads(_row(db, "SELECT settings FROM sessions WHERE id = ?", sid)[0])
            for key, value in changes.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            sets, args = ["settings = ?", "updated_at = ?"], [_dump_settings(merged), utc_now()]
            for column, value in (("system", system), ("model", model), ("model_fingerprint", model_fingerprint)):
                if value is not _UNSET:
                    sets.append(f"{column} = ?")
                    args.append(_opt_text(value))
            db.execute(f"UPDATE sessions SET {', '.join(sets)} WHERE id = ?", (*args, sid))
            return _load(db, sid)

    # ----------------------------------------------------------------------------------- memories

    def add_memory(self, session: str | Session, memory: MemoryRef | str, key: str | None = None) -> Session:
        """Attach a memory (appended last). Attaching a name already attached updates its key in place."""
        ref = _memory_refs([memory if isinstance(memory, MemoryRef) or key is None else (memory, key)])[0]
        with self._write() as db:
            sid = _resolve(db, session)
            now = utc_now()
            if _row(db, "SELECT 1 FROM session_memories WHERE session_id = ? AND name = ?", sid, ref.name):
                db.execute("UPDATE session_memories SET content_key = ? WHERE session_id = ? AND name = ?",
                           (ref.key, sid, ref.name))
            else:
                db.execute(
                    "INSERT INTO session_memories (session_id, position, name, content_key, added_at) VALUES"
                    " (?, (SELECT COALESCE(MAX(position), 0) + 1 FROM session_memories WHERE session_id = ?),"
                    " ?, ?, ?)", (sid, sid, ref.name, ref.key, now))
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, sid))
            return _load(db, sid)

    def drop_memory(self, session: str | Session, name: str) -> Session:
        """Detach a memory by name; the turns stay. Raises MemoryNotAttachedError."""
        with self._write() as db:
            sid = _resolve(db, session)
            cur = db.execute("DELETE FROM session_memories WHERE session_id = ? AND name = ?", (sid, name))
            if cur.rowcount == 0:
                raise MemoryNotAttachedError(f"session {_name_of(db, sid)!r} has no memory named {name!r}")
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (utc_now(), sid))
            return _load(db, sid)

    # -------------------------------------------------------------------------------------- turns

    def append_turn(self, session: str | Session, question: str, answer: str, *, sources: Iterable[Any] | None = None,
                    usage: Mapping[str, Any] | None = None, timings: Mapping[str, Any] | None = None,
                    interrupted: bool = False) -> Turn:
        """Save one question and its answer as the session's next turn (seq = last + 1).

        The first question of an unnamed session names it. Non-finite numbers in usage/timings (a
        tokens/s of a zero-length decode) are stored as null: the JSON must stay standard.
        """
        if not isinstance(question, str) or not isinstance(answer, str):
            raise SessionValueError("question and answer must be text")
        question, answer = _clean(question), _clean(answer)
        sources_json = _dump_payload(list(sources or []), "sources")
        usage_json = _dump_payload(dict(usage or {}), "usage")
        timings_json = _dump_payload(dict(timings or {}), "timings")
        with self._write() as db:
            sid = _resolve(db, session)
            seq = _row(db, "SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE session_id = ?", sid)[0]
            tid, now = new_ulid(), utc_now()
            db.execute(
                "INSERT INTO turns (id, session_id, seq, question, answer, sources, usage, timings, interrupted,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tid, sid, seq, question, answer, sources_json, usage_json, timings_json, int(bool(interrupted)), now))
            if _row(db, "SELECT auto_named FROM sessions WHERE id = ?", sid)[0]:
                db.execute("UPDATE sessions SET name = ?, auto_named = 0 WHERE id = ?",
                           (_unique_name(db, slugify(question), exclude=sid), sid))
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, sid))
            return _turn(_row(db, f"SELECT {_TURN_COLS} FROM turns WHERE id = ?", tid))

    def turns(self, session: str | Session, limit: int | None = None) -> list[Turn]:
        """The session's turns in order; with `limit`, only the last `limit` of them (still in order)."""
        with self._read() as db:
            sid = _resolve(db, session)
            if limit is None:
                rows = db.execute(f"SELECT {_TURN_COLS} FROM turns WHERE session_id = ? ORDER BY seq", (sid,))
            else:
                rows = db.execute(f"SELECT * FROM (SELECT {_TURN_COLS} FROM turns WHERE session_id = ?"
                                  " ORDER BY seq DESC LIMIT ?) ORDER BY seq", (sid, _positive(limit, "limit")))
            return [_turn(r) for r in rows]

    def clear(self, session: str | Session) -> int:
        """Forget the session's turns (the next one is seq 1 again); keep its memories and settings.
        Returns how many turns were removed."""
        with self._write() as db:
            sid = _resolve(db, session)
            n = db.execute("DELETE FROM turns WHERE session_id = ?", (sid,)).rowcount
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (utc_now(), sid))
            return n

    # ------------------------------------------------------------------------------------- search

    def search(self, text: str, limit: int = 20, *, session: str | Session | None = None) -> list[SearchHit]:
        """Turns whose question or answer contain every word of `text`, best match first (FTS5 rank;
        newest first in the LIKE fallback). Words are matched literally: quotes, operators (AND, NEAR),
        `*` and parentheses in `text` are plain characters, never query syntax."""
        limit = _positive(limit, "limit")
        terms = search_terms(text)
        if not terms:
            return []
        with self._read() as db:
            sid = _resolve(db, session) if session is not None else None
            if self.fts:
                query = " ".join('"' + t.replace('"', '""') + '"' for t in terms)
                sql = (f"SELECT {_TURN_COLS_T}, s.name, snippet(turns_fts, -1, '', '', '…', 16) FROM turns_fts"
                       " JOIN turns t ON t.pk = turns_fts.rowid JOIN sessions s ON s.id = t.session_id"
                       " WHERE turns_fts MATCH ?" + (" AND t.session_id = ?" if sid else "") +
                       " ORDER BY turns_fts.rank, t.pk DESC LIMIT ?")
                args: tuple[Any, ...] = (query, sid, limit) if sid else (query, limit)
                return [SearchHit(r[1], r[-2], _turn(r[:-2]), r[-1]) for r in db.execute(sql, args)]
            like = []
            args = ()
            for t in terms:
                pattern = "%" + re.sub(r"([\\%_])", r"\\\1", t) + "%"
                like.append("(t.question LIKE ? ESCAPE '\\' OR t.answer LIKE ? ESCAPE '\\')")
                args += (pattern, pattern)
            sql = (f"SELECT {_TURN_COLS_T}, s.name FROM turns t JOIN sessions s ON s.id = t.session_id WHERE "
                   + " AND ".join(like) + (" AND t.session_id = ?" if sid else "") + " ORDER BY t.pk DESC LIMIT ?")
            args += ((sid, limit) if sid else (limit,))
            hits = []
            for r in db.execute(sql, args):
                turn = _turn(r[:-1])
                hits.append(SearchHit(turn.session_id, r[-1], turn, _snippet(turn, terms[0])))
            return hits

    # ------------------------------------------------------------------------------------- export

    def export(self, session: str | Session, format: str = "md") -> str:
        """The whole session as Markdown (for reading) or JSON ({"format", "version", "session", "turns"})."""
        if format not in ("md", "json"):
            raise SessionValueError(f"unknown export format {format!r} (use md or json)")
        with self._read() as db:
            sid = _resolve(db, session)
            s = _load(db, sid)
            turns = [_turn(r) for r in db.execute(
                f"SELECT {_TURN_COLS} FROM turns WHERE session_id = ? ORDER BY seq", (sid,))]
        if format == "json":
            return json.dumps({"format": "combllama-session", "version": 1, "session": s.to_dict(),
                               "turns": [t.to_dict() for t in turns]}, indent=2, ensure_ascii=False) + "\n"
        return _markdown(s, turns)


# ------------------------------------------------------------------------------------------ helpers

_SESSION_COLS = "id, name, auto_named, created_at, updated_at, model, model_fingerprint, system, settings"
_TURN_COLS = "id, session_id, seq, question, answer, sources, usage, timings, interrupted, created_at"
_TURN_COLS_T = ", ".join("t." + c.strip() for c in _TURN_COLS.split(","))


def _row(db: sqlite3.Connection, sql: str, *args: Any) -> tuple | None:
    return db.execute(sql, args).fetchone()


def _resolve(db: sqlite3.Connection, session: str | Session) -> str:
    """The id of a session given as a record, a name or an id."""
    if isinstance(session, Session):
        row = _row(db, "SELECT id FROM sessions WHERE id = ?", session.id)
        label = session.name
    elif isinstance(session, str):
        row = _row(db, "SELECT id FROM sessions WHERE name = ?", session)
        if row is None and looks_like_ulid(session):
            row = _row(db, "SELECT id FROM sessions WHERE id = ?", session.upper())
        label = session
    else:
        raise SessionValueError(f"not a session: {session!r}")
    if row is None:
        raise SessionNotFoundError(f"no session named {label!r}")
    return row[0]


def _name_of(db: sqlite3.Connection, sid: str) -> str:
    return _row(db, "SELECT name FROM sessions WHERE id = ?", sid)[0]


def _load(db: sqlite3.Connection, sid: str) -> Session:
    row = _row(db, f"SELECT {_SESSION_COLS} FROM sessions WHERE id = ?", sid)
    mems = [MemoryRef(n, k) for n, k in db.execute(
        "SELECT name, content_key FROM session_memories WHERE session_id = ? ORDER BY position", (sid,))]
    count = _row(db, "SELECT COUNT(*) FROM turns WHERE session_id = ?", sid)[0]
    return _session(row, mems, count)


def _session(row: tuple, mems: list[MemoryRef], count: int) -> Session:
    sid, name, auto, created, updated, model, fp, system, settings = row
    return Session(id=sid, name=name, created_at=created, updated_at=updated, model=model, model_fingerprint=fp,
                   system=system, settings=json.loads(settings), memories=tuple(mems), turn_count=count,
                   auto_named=bool(auto))


def _turn(row: tuple) -> Turn:
    tid, sid, seq, q, a, sources, usage, timings, interrupted, created = row
    return Turn(id=tid, session_id=sid, seq=seq, question=q, answer=a, sources=json.loads(sources),
                usage=json.loads(usage), timings=json.loads(timings), interrupted=bool(interrupted),
                created_at=created)


def _unique_name(db: sqlite3.Connection, base: str, exclude: str | None = None) -> str:
    """`base`, or `base-2`, `base-3`, ... whichever is free (call under the write lock)."""
    candidate, n = base, 1
    while True:
        row = _row(db, "SELECT id FROM sessions WHERE name = ?", candidate)
        if row is None or row[0] == exclude:
            return candidate
        n += 1
        candidate = with_suffix(base, n)


def _require_name(name: str) -> None:
    why = check_name(name)
    if why:
        raise SessionNameError(f"{name!r}: {why}")


def _positive(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SessionValueError(f"{what} must be a positive integer, not {n!r}")
    return n


def _clean(text: str) -> str:
    """Text SQLite can store: lone surrogates (undecodable terminal bytes) become U+FFFD instead of
    failing the whole turn."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _opt_text(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SessionValueError(f"expected text, not {type(value).__name__}")
    return _clean(value)


def _memory_refs(memories: Iterable[MemoryRef | str | tuple[str, str | None]]) -> list[MemoryRef]:
    if isinstance(memories, (str, MemoryRef)):
        memories = [memories]
    refs: dict[str, MemoryRef] = {}
    for m in memories:
        if isinstance(m, str):
            m = MemoryRef(m)
        elif isinstance(m, tuple) and len(m) == 2:
            m = MemoryRef(*m)
        if not isinstance(m, MemoryRef) or not isinstance(m.name, str) or not m.name.strip() or \
                not (m.key is None or isinstance(m.key, str)):
            raise SessionValueError(f"not a memory reference: {m!r}")
        refs.setdefault(m.name, MemoryRef(_clean(m.name), None if m.key is None else _clean(m.key)))
    return list(refs.values())


def _dump_settings(settings: dict[str, Any]) -> str:
    if not all(isinstance(k, str) for k in settings):
        raise SessionValueError("settings keys must be text")
    try:
        return json.dumps(settings, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SessionValueError(f"settings must be plain JSON values: {e}") from e


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dump_payload(value: Any, what: str) -> str:
    try:
        return json.dumps(_finite(value), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SessionValueError(f"{what} must be plain JSON values: {e}") from e


def search_terms(text: str) -> list[str]:
    """The words of a search: whitespace-separated, control characters dropped, at most 32; a word with
    no letter or digit cannot match anything and is dropped."""
    if not isinstance(text, str):
        raise SessionValueError("search text must be text")
    terms = []
    for raw in text.split():
        term = "".join(ch for ch in raw if ch.isprintable())
        if any(ch.isalnum() for ch in term):
            terms.append(term)
        if len(terms) == MAX_SEARCH_TERMS:
            break
    return terms


def _snippet(turn: Turn, term: str, width: int = 60) -> str:
    for text in (turn.question, turn.answer):
        i = text.lower().find(term.lower())
        if i >= 0:
            a, b = max(0, i - width), min(len(text), i + len(term) + width)
            return ("…" if a else "") + " ".join(text[a:b].split()) + ("…" if b < len(text) else "")
    return ""


def _markdown(s: Session, turns: list[Turn]) -> str:
    out = [f"# {s.name}", "", f"- id: `{s.id}`", f"- created: {s.created_at}", f"- updated: {s.updated_at}"]
    if s.model:
        out.append(f"- model: {s.model}" + (f" (`{s.model_fingerprint}`)" if s.model_fingerprint else ""))
    if s.memories:
        out.append("- memories: " + ", ".join(m.name + (f" (`{m.key}`)" if m.key else "") for m in s.memories))
    if s.settings:
        out.append("- settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.settings.items())))
    if s.system:
        out += ["", "## System", "", s.system]
    for t in turns:
        out += ["", f"## {t.seq}. {t.created_at}", "", "**Question:**", "", t.question, "", "**Answer:**", "",
                t.answer + (" *[interrupted]*" if t.interrupted else "")]
        cited = [_cite(src) for src in t.sources]
        if any(cited):
            out += ["", "Sources: " + "; ".join(c for c in cited if c)]
    return "\n".join(out) + "\n"


def _cite(src: Any) -> str:
    """One source as a reader would cite it: `doc, p. 12` or `path:10-20`."""
    if not isinstance(src, dict):
        return str(src)
    where = src.get("path") or src.get("doc") or ""
    if src.get("page_label"):
        return f"{src.get('doc') or where}, p. {src['page_label']}"
    lines = src.get("lines")
    if isinstance(lines, (list, tuple)) and len(lines) == 2:
        return f"{where}:{lines[0]}-{lines[1]}"
    return str(where)


def _private_dirs(path: Path) -> None:
    """Create missing parents one by one with mode 0o700 (mkdir(parents=True) ignores mode for parents)."""
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass


def _private_file(path: Path) -> None:
    """Create the database file 0o600 ourselves; SQLite gives the -wal/-shm files the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
