"""Hypothesis stateful models with crashes.

Memory store: add_chunk / commit / crash (the writer dropped without a commit, with staging debris) /
a fault at the Nth os call during a commit / reopen / resume / remove. Invariant: what is on disk is
exactly the last committed manifest (or, when a commit failed after its rename, the one it wrote),
and every listed chunk verifies.

Sessions: appends, and a writer process SIGKILLed at a random moment in the middle of appending.
Invariant: every turn the store reports is intact and in order; the killed writer's turns are a
prefix of what it was writing; the store stays writable.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from faults import Fault, Shim
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from combllama.core.errors import ResourceError
from combllama.core.memory.bundle import MANIFEST, MemoryReader, MemoryWriter
from combllama.core.memory.store import MemoryStore
from combllama.sessions.store import SessionStore

N_TOKENS = 4096
HEADER = {"name": "m", "model": {"fingerprint": "cmfp1:test", "n_layers": 2, "n_kv_heads": 2, "head_dim": 4},
          "method": {"name": "full", "version": 1, "params": {}}, "chunking": {"chunk_tokens": 64},
          "source": {"name": "doc", "sha256": "0" * 64}, "positions": {"logical_length": N_TOKENS},
          "content_key": "k"}


def _tensors(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"k": torch.randn(2, 2, n, 4, generator=g), "v": torch.randn(2, 2, n, 4, generator=g)}


def _view(manifest: dict) -> list[tuple]:
    return [(c["start"], c["end"], c["sha256"]) for c in manifest["chunks"]]


class MemoryStoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="combllama-store-"))
        self.store = MemoryStore(self.dir)
        self.root = self.dir / "m"
        self.writer: MemoryWriter | None = None
        self.committed: list[tuple] | None = None  # None: no memory on disk
        self.alternatives: list[list[tuple]] = []  # other states a failed commit may have left
        self.pending: list[tuple] = []

    def teardown(self):
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self) -> int:
        rows = (self.committed or []) + self.pending
        return rows[-1][1] if rows else 0

    @precondition(lambda self: self.writer is None)
    @rule()
    def open_writer(self):
        if self.committed is None:
            self.writer = MemoryWriter.create(self.root, HEADER, list(range(N_TOKENS)))
            self.committed = []
        else:
            self.writer = MemoryWriter.resume(self.root, {"content_key": "k"})  # resume: cleans orphans
        self.pending = []

    @precondition(lambda self: self.writer is not None)
    @rule(n=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
    def add_chunk(self, n, seed):
        start = self._end()
        end = min(start + n, N_TOKENS)
        if end <= start:
            return
        rec = self.writer.add_chunk(start, end, "t" * 64, [], _tensors(seed, end - start))
        self.pending.append((start, end, rec["sha256"]))

    @precondition(lambda self: self.writer is not None)
    @rule()
    def commit(self):
        self.writer.commit()
        self.committed = self.committed + self.pending
        self.pending = []

    @precondition(lambda self: self.writer is not None)
    @rule(op=st.sampled_from(["open", "write", "fsync", "replace"]), nth=st.integers(1, 4),
          action=st.sampled_from(["ENOSPC", "EIO"]))
    def failing_commit(self, op, nth, action):
        """A commit that fails on the Nth os call; the writer is then abandoned (as the CLI does)."""
        before, after = self.committed, self.committed + self.pending
        with Shim(Fault(op, nth, action)) as shim:
            try:
                self.writer.commit()
                failed = False
            except ResourceError:
                failed = True
        assert failed == shim.fired
        if failed:
            self.committed, self.alternatives = before, [after]
            self.crash()
        else:
            self.committed, self.pending = after, []

    @precondition(lambda self: self.writer is not None)
    @rule(debris=st.booleans())
    def crash(self, debris=True):
        """The process dies: no commit; staged files and half-written chunks stay behind."""
        if debris:
            (self.root / "tmp" / f".MANIFEST.json.{os.getpid()}.tmp").write_bytes(b'{"half')
            (self.root / "chunks" / "000777-deadbeef0000.safetensors").write_bytes(b"half")
        self.writer._lock.release()
        self.writer = None
        self.pending = []

    @precondition(lambda self: self.writer is None and self.committed is not None)
    @rule()
    def reopen(self):
        reader = self.store.open(self.root)
        assert reader.verify() == []

    @precondition(lambda self: self.writer is None and self.committed is not None)
    @rule()
    def remove(self):
        self.store.remove("m")
        self.committed, self.alternatives = None, []
        assert not self.root.exists()

    @invariant()
    def disk_is_the_last_commit(self):
        if self.committed is None:
            assert not (self.root / MANIFEST).exists()
            return
        on_disk = _view(MemoryReader(self.root).manifest)
        if on_disk != self.committed and on_disk in self.alternatives:
            self.committed = on_disk  # the failed commit had renamed its manifest before the error
        assert on_disk == self.committed
        self.alternatives = []
        reader = MemoryReader(self.root)
        for rec in reader.manifest["chunks"]:
            tensors = reader.chunk(rec)  # size, sha256, header, shapes, finiteness
            assert tensors["k"].shape[2] == rec["end"] - rec["start"]
        if self.writer is None:
            assert reader.verify() == []


MemoryStoreMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_memory_store_state_machine = MemoryStoreMachine.TestCase


def _append_forever(path: Path, tag: str) -> None:
    """The killed writer: appends numbered turns until it is killed (runs in a forked child)."""
    try:
        with SessionStore(path) as s:
            i = 0
            while True:
                s.append_turn("chat", f"{tag} q{i}", f"{tag} a{i} " + hashlib.sha256(f"{tag}{i}".encode()).hexdigest())
                i += 1
    finally:
        os._exit(0)


class SessionsCrashMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="combllama-sessions-crash-"))
        self.path = self.dir / "sessions.db"
        self.store = SessionStore(self.path)
        self.store.create("chat")
        self.turns: list[tuple[str, str]] = []
        self.kills = 0

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(q=st.text(max_size=30), a=st.text(max_size=30))
    def append(self, q, a):
        self.store.append_turn("chat", q, a)
        self.turns.append((self.store.turns("chat")[-1].question, self.store.turns("chat")[-1].answer))

    @rule(delay_ms=st.integers(0, 60))
    def killed_writer(self, delay_ms):
        tag = f"k{self.kills}"
        self.kills += 1
        pid = os.fork()
        if pid == 0:
            _append_forever(self.path, tag)
        time.sleep(delay_ms / 1000)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        added = [(t.question, t.answer) for t in self.store.turns("chat")[len(self.turns):]]
        expected = [(f"{tag} q{i}", f"{tag} a{i} " + hashlib.sha256(f"{tag}{i}".encode()).hexdigest())
                    for i in range(len(added))]
        assert added == expected  # a prefix of what the killed writer appended, every turn whole
        self.turns += added

    @rule()
    def reopen(self):
        self.store.close()
        self.store = SessionStore(self.path)

    @invariant()
    def turns_intact(self):
        turns = self.store.turns("chat")
        assert [(t.question, t.answer) for t in turns] == self.turns
        assert [t.seq for t in turns] == list(range(1, len(turns) + 1))


SessionsCrashMachine.TestCase.settings = settings(max_examples=12, stateful_step_count=12, deadline=None)
test_sessions_crash_state_machine = SessionsCrashMachine.TestCase
