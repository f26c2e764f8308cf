"""Fixtures of the sessions tests: a fresh store in tmp_path."""
from __future__ import annotations

import pytest

from combllama.sessions.store import SessionStore


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "sessions.db"


@pytest.fixture
def store(db_path):
    with SessionStore(db_path) as s:
        yield s
