"""Errors of the sessions store. `sessions` is a leaf (it may not import core), so it has its own
types; the CLI maps each to a one-line message and its `exit_code` (README "Exit codes")."""
from __future__ import annotations


class SessionError(Exception):
    """Base of every sessions failure. `exit_code` is what the CLI exits with."""

    exit_code = 1


class SessionNotFoundError(SessionError):
    """No session of that name or id (or no memory of that name attached to the session)."""

    exit_code = 3


class MemoryNotAttachedError(SessionNotFoundError):
    """The session does not reference a memory of that name."""


class SessionExistsError(SessionError):
    """A session of that name already exists (names are unique, case-insensitively)."""

    exit_code = 3


class SessionNameError(SessionError):
    """A name that cannot be a session name (empty, too long, odd characters, looks like an id)."""

    exit_code = 3


class SessionValueError(SessionError):
    """A value that cannot be stored: settings or usage that are not JSON, a non-positive limit."""

    exit_code = 3


class SessionBusyError(SessionError):
    """Another process held the database past the timeout (a long write, a stuck process)."""

    exit_code = 75


class SessionSchemaError(SessionError):
    """The database was written by a newer combllama (it records migrations this code does not know),
    or it is not a combllama sessions database at all."""

    exit_code = 7


class SessionDatabaseError(SessionError):
    """SQLite refused the file: not a database, corrupt, unreadable, disk full."""

    exit_code = 1


class SessionDiskFullError(SessionDatabaseError):
    """SQLite could not write for lack of space (SQLITE_FULL): a resource limit, not a bug."""

    exit_code = 4
