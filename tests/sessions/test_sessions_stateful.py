"""Hypothesis stateful test: random sequences of create/append/rename/delete/clear/memories/reopen
against a plain in-memory model; after every step the store and the model agree."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from combllama.sessions import ids
from combllama.sessions.errors import MemoryNotAttachedError, SessionExistsError, SessionNotFoundError
from combllama.sessions.store import SessionStore

# Few distinct names, so collisions (also case-only ones, and with "untitled") happen often.
NAMES = st.sampled_from(["book", "Book", "repo", "notes", "untitled", "untitled-2", "chat", "q"])
MEMORIES = st.sampled_from(["lighthouse", "repo", "manual"])
QUESTIONS = st.sampled_from(["Who keeps the light?", "q", "What's up?", "???", "Chat", ""]) | st.text(max_size=20)


class SessionsMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="combllama-sessions-"))
        self.path = self.dir / "sessions.db"
        self.store = SessionStore(self.path)
        # id -> {"name", "auto", "turns": [(question, answer, interrupted)], "memories": [names]}
        self.model: dict[str, dict] = {}

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def taken(self, name: str, exclude: str | None = None) -> bool:
        return any(s["name"].lower() == name.lower() for sid, s in self.model.items() if sid != exclude)

    def pick(self, data) -> str:
        return data.draw(st.sampled_from(sorted(self.model)))

    @rule(name=st.none() | NAMES, memories=st.lists(MEMORIES, max_size=3, unique=True))
    def create(self, name, memories):
        if name is not None and self.taken(name):
            with pytest.raises(SessionExistsError):
                self.store.create(name, memories=memories)
            return
        s = self.store.create(name, memories=memories)
        if name is None:
            assert s.auto_named and (s.name == "untitled" or s.name.startswith("untitled-"))
            assert not self.taken(s.name)
        else:
            assert s.name == name
        self.model[s.id] = {"name": s.name, "auto": name is None, "turns": [], "memories": list(memories)}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), question=QUESTIONS, answer=st.text(max_size=20), interrupted=st.booleans(),
          by_name=st.booleans())
    def append(self, data, question, answer, interrupted, by_name):
        sid = self.pick(data)
        m = self.model[sid]
        t = self.store.append_turn(m["name"] if by_name else sid, question, answer, interrupted=interrupted)
        m["turns"].append((question, answer, interrupted))
        assert t.seq == len(m["turns"]) and t.session_id == sid
        if m["auto"]:
            name = self.store.get(sid).name
            base = ids.slugify(question)
            assert name == base or (name.startswith(base[:50]) and name.rsplit("-", 1)[1].isdigit())
            assert not self.taken(name, exclude=sid)
            m["name"], m["auto"] = name, False

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=NAMES)
    def rename(self, data, new):
        sid = self.pick(data)
        if self.taken(new, exclude=sid):
            with pytest.raises(SessionExistsError):
                self.store.rename(self.model[sid]["name"], new)
            return
        assert self.store.rename(self.model[sid]["name"], new).id == sid
        self.model[sid].update(name=new, auto=False)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        sid = self.pick(data)
        self.store.delete(self.model.pop(sid)["name"])
        with pytest.raises(SessionNotFoundError):
            self.store.get(sid)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def clear(self, data):
        sid = self.pick(data)
        assert self.store.clear(sid) == len(self.model[sid]["turns"])
        self.model[sid]["turns"] = []

    @precondition(lambda self: self.model)
    @rule(data=st.data(), memory=MEMORIES)
    def add_memory(self, data, memory):
        sid = self.pick(data)
        self.store.add_memory(sid, memory)
        if memory not in self.model[sid]["memories"]:
            self.model[sid]["memories"].append(memory)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), memory=MEMORIES)
    def drop_memory(self, data, memory):
        sid = self.pick(data)
        mems = self.model[sid]["memories"]
        if memory in mems:
            self.store.drop_memory(sid, memory)
            mems.remove(memory)
        else:
            with pytest.raises(MemoryNotAttachedError):
                self.store.drop_memory(sid, memory)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = SessionStore(self.path)

    @invariant()
    def store_matches_model(self):
        listed = self.store.list()
        assert {s.id for s in listed} == set(self.model)
        for s in listed:
            m = self.model[s.id]
            assert (s.name, s.auto_named, s.turn_count, s.memory_names) == \
                (m["name"], m["auto"], len(m["turns"]), m["memories"])
            turns = self.store.turns(s.id)
            assert [t.seq for t in turns] == list(range(1, len(m["turns"]) + 1))
            assert [(t.question, t.answer, t.interrupted) for t in turns] == m["turns"]
        latest = self.store.latest()
        assert (latest is None) == (not self.model)
        if listed:
            assert latest == listed[0]


SessionsMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_sessions_state_machine = SessionsMachine.TestCase
