"""Fault injection on the write path, in the spirit of SQLite's test6.c: the Nth call of os.open,
os.write, os.fsync or os.replace fails with ENOSPC or EIO, "loses" its fsync, or SIGKILLs the process.

A shim can also hold a manifest commit (COMBLLAMA_TEST_PAUSE) so that a test can signal the process while
it is inside one. Test-harness code only: the product never reads the variables below. `Shim` patches the `os` module in
the current process (combllama looks functions up as `os.write` at call time, so the patch is seen);
`install_from_env` is what the kill-loop child calls before it runs the CLI.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from dataclasses import dataclass, field

ENV = "COMBLLAMA_TEST_FAULT"  # "op:nth:action", e.g. "replace:3:kill"; read only by tests/reliability
ENV_LOG = "COMBLLAMA_TEST_COMMIT_LOG"  # the child appends "intent|done <sha256>" around each manifest commit
ENV_PAUSE = "COMBLLAMA_TEST_PAUSE"  # "N:before" or "N:after": hold inside the Nth manifest commit, before or
#                                    after its os.replace onto MANIFEST.json
ENV_PAUSED = "COMBLLAMA_TEST_PAUSED"  # a file the shim creates when it starts holding (the test's cue)
PAUSE_SECONDS = 60.0  # then the commit goes on
OPS = ("open", "write", "fsync", "replace")
ACTIONS = ("ENOSPC", "EIO", "lose", "kill")


@dataclass(frozen=True)
class Fault:
    op: str
    nth: int  # 1-based count of calls of `op` since the shim was installed
    action: str

    def __post_init__(self) -> None:
        if self.op not in OPS or self.action not in ACTIONS or self.nth < 1:
            raise ValueError(f"bad fault {self}")
        if self.action == "lose" and self.op != "fsync":
            raise ValueError("only an fsync can be lost")

    @classmethod
    def parse(cls, text: str) -> "Fault":
        op, nth, action = text.split(":")
        return cls(op, int(nth), action)

    def __str__(self) -> str:
        return f"{self.op}:{self.nth}:{self.action}"


@dataclass
class Shim:
    """Counts calls of the four functions and fires `fault` once. `lost` records the paths whose fsync
    was skipped (a power cut would lose their unsynced data: `power_cut()` simulates that)."""

    fault: Fault | None
    counts: dict = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    fired: bool = False
    lost: list = field(default_factory=list)  # paths (after renames) whose data was never synced
    _fd_paths: dict = field(default_factory=dict)
    _real: dict = field(default_factory=dict)
    pause: tuple[int, str] | None = None  # (nth manifest commit, "before" | "after")
    commits: int = 0  # manifest commits (os.replace onto MANIFEST.json) seen

    def install(self) -> "Shim":
        for op in OPS:
            self._real[op] = getattr(os, op)
            setattr(os, op, getattr(self, f"_{op}"))
        return self

    def uninstall(self) -> None:
        for op, fn in self._real.items():
            setattr(os, op, fn)
        self._real.clear()

    def __enter__(self) -> "Shim":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _due(self, op: str) -> bool:
        self.counts[op] += 1
        f = self.fault
        if f is not None and not self.fired and f.op == op and self.counts[op] == f.nth:
            self.fired = True
            return True
        return False

    def _fail(self, op: str, path=None):
        action = self.fault.action
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        code = errno.ENOSPC if action == "ENOSPC" else errno.EIO
        raise OSError(code, os.strerror(code), *([os.fspath(path)] if path is not None else []))

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        if self._due("open"):
            self._fail("open", path)
        fd = self._real["open"](path, flags, mode, dir_fd=dir_fd)
        self._fd_paths[fd] = os.fspath(path)
        return fd

    def _write(self, fd, data):
        if self._due("write"):
            if self.fault.action == "kill":  # die in the middle of the write: half the bytes land
                self._real["write"](fd, memoryview(data)[: max(1, len(data) // 2)])
            self._fail("write")
        return self._real["write"](fd, data)

    def _fsync(self, fd):
        if self._due("fsync"):
            if self.fault.action == "lose":
                path = self._fd_paths.get(fd)
                if path is not None:
                    self.lost.append(path)
                return None
            self._fail("fsync")
        return self._real["fsync"](fd)

    def _replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        src_s, dst_s = os.fspath(src), os.fspath(dst)
        log = os.environ.get(ENV_LOG)
        manifest = bool(log) and dst_s.endswith("MANIFEST.json")
        hold = None
        if dst_s.endswith("MANIFEST.json"):
            self.commits += 1
            hold = self.pause[1] if self.pause and self.pause[0] == self.commits else None
        if manifest:  # logged before the fault, so a kill here counts as a kill inside a commit
            digest = _sha_file(src_s)
            _append(log, f"intent {digest}\n")
        if hold == "before":
            _hold()
        if self._due("replace"):
            self._fail("replace", src)
        self.lost = [dst_s if p == src_s else p for p in self.lost]
        self._real["replace"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        if manifest:
            _append(log, f"done {digest}\n")
        if hold == "after":
            _hold()

    def power_cut(self) -> list[str]:
        """Simulate losing the page cache: every file whose fsync was lost comes back empty."""
        hit = []
        for path in self.lost:
            if os.path.isfile(path):
                with open(path, "r+b") as f:
                    f.truncate(0)
                hit.append(path)
        return hit


def _sha_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _append(path: str, line: str) -> None:
    # O_APPEND write straight to the file: the page cache survives a SIGKILL, so no fsync is needed.
    with open(path, "a") as f:
        f.write(line)


def _hold() -> None:
    """Sleep inside the commit for PAUSE_SECONDS, after creating the ENV_PAUSED file. Signal handlers run
    during the sleep: one that raises (a second Ctrl-C) ends the hold with its exception."""
    marker = os.environ.get(ENV_PAUSED)
    if marker:
        open(marker, "w").close()
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.02)


def install_from_env() -> Shim | None:
    """The kill-loop child's hook: a commit log, a fault and/or a held commit from the environment."""
    spec, log, pause = os.environ.get(ENV), os.environ.get(ENV_LOG), os.environ.get(ENV_PAUSE)
    if not spec and not log and not pause:
        return None
    shim = Shim(Fault.parse(spec) if spec else None)
    if pause:
        nth, when = pause.split(":")
        shim.pause = (int(nth), when)
    return shim.install()
