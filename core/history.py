"""Long chats: when a session's history outgrows its recent window, the oldest turns are folded into the
session's own memory, encoded with the session's method (CombLlama by default), so a chat goes on for
hundreds of turns at bounded memory and can still recall an early turn.

Only methods whose memory takes no window positions fold (CombLlama: cross memory); with any other
method a memory of the turns would take the positions the turns take, so the oldest turns are left out
of the prompt as before. Each fold is one sealed memory (a "segment") of whole turns, named after the
turns it holds; segments are never changed, only added, merged or removed. When their tensors outgrow
the byte budget, every folded turn is encoded again into one segment at the fraction that fits half the
budget (methods that prune by budget: CombLlama's KVCompose pruning of its cross memory); otherwise, or
below `min_fraction`, the oldest segment is forgotten. Either way the memory never exceeds the budget.

`fold_point` is pure (token counts in, a turn count out); SessionHistory does the I/O through core.memory
and core.encode. Knows nothing of SQLite (turns arrive as (seq, question, answer)) and never prints.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import BadInputError, CombllamaError

STATE = "history.json"  # what was forgotten; the segments describe the rest
_SEGMENT = re.compile(r"^([hc])(\d{7})-(\d{7})$")  # h: a fold, c: a compaction of every folded turn


@dataclass(frozen=True)
class HistoryPolicy:
    """`recent_tokens`: history kept verbatim in the prompt; past it, the oldest turns fold until it is
    `fold_tokens` below (so one fold is about `fold_tokens` of turns). `budget_bytes`: the session memory's
    tensor bytes at most (None: a quarter of the window's full KV, `default_budget`)."""

    recent_tokens: int = 1024
    fold_tokens: int = 384
    budget_bytes: int | None = None
    min_fraction: float = 0.05  # compaction below this forgets the oldest turns instead

    def __post_init__(self) -> None:
        if self.fold_tokens < 16 or self.recent_tokens < self.fold_tokens:
            raise BadInputError("history needs fold_tokens >= 16 and recent_tokens >= fold_tokens")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise BadInputError("the history budget must be positive")
        if not 0 < self.min_fraction <= 1:
            raise BadInputError("min_fraction must be in (0, 1]")


    @classmethod
    def for_window(cls, window: int, positions: int, budget_bytes: int | None = None) -> "HistoryPolicy":
        """The chat's policy: history folds past what the window leaves next to documents taking
        `positions`, a question and an answer (at most 1,024 tokens; one fold about half of that)."""
        recent = max(64, min(1024, window - positions - 768))
        return cls(recent_tokens=recent, fold_tokens=max(16, min(384, recent // 2)), budget_bytes=budget_bytes)


def turn_counter(tokenizer) -> Callable[[str, str], int]:
    """count(question, answer): the tokens one turn adds to the prompt (chat template included), memoized."""
    from functools import lru_cache

    from .prompt import Turn, turn_ids

    base = len(turn_ids(tokenizer, "", []))

    @lru_cache(maxsize=8192)
    def count(question: str, answer: str) -> int:
        return len(turn_ids(tokenizer, "", [Turn(question, answer)])) - base

    return count


def default_budget(loaded) -> int:
    """A quarter of the bytes a full KV cache of the model's whole window takes."""
    L, H, D = loaded.kv_shape
    return loaded.window * L * 2 * H * D * loaded.dtype.itemsize // 4


def fold_point(turn_tokens: Sequence[int], folded: int, policy: HistoryPolicy) -> int:
    """How many of the oldest turns are folded once `turn_tokens` (per turn, oldest first) is the history
    and `folded` of them already are. The newest turn always stays verbatim."""
    unfolded = sum(turn_tokens[folded:])
    if unfolded <= policy.recent_tokens:
        return folded
    n = folded
    while n < len(turn_tokens) - 1 and unfolded > policy.recent_tokens - policy.fold_tokens:
        unfolded -= turn_tokens[n]
        n += 1
    return n


@dataclass(frozen=True)
class Segment:
    name: str
    first: int  # seq of the first and last turn it holds
    last: int
    compacted: bool

    @classmethod
    def parse(cls, name: str) -> "Segment | None":
        m = _SEGMENT.match(name)
        return cls(name, int(m[2]), int(m[3]), m[1] == "c") if m else None

    @classmethod
    def of(cls, first: int, last: int, compacted: bool) -> "Segment":
        return cls(f"{'c' if compacted else 'h'}{first:07d}-{last:07d}", first, last, compacted)


@dataclass
class Event:
    """What a sync did, for the caller to report: kind "fold", "compact" or "forget"."""

    kind: str
    first: int
    last: int
    tokens: int = 0
    bytes: int = 0
    fraction: float = 1.0


@dataclass
class SyncResult:
    folded: int  # turns (of those passed in) in the memory or forgotten: the prompt carries the rest
    events: list[Event] = field(default_factory=list)
    bytes: int = 0  # the session memory's tensor bytes after the sync
    budget: int = 0


class SessionHistory:
    """The folded part of one session's history: segment memories in `root` (a MemoryStore directory of
    its own), built with `method`. `count_tokens(question, answer)` is what a turn costs in the prompt."""

    def __init__(self, loaded, root: Path, method, policy: HistoryPolicy, session: str,
                 count_tokens: Callable[[str, str], int], *, system: str | None = None):
        from .encode import EncodeConfig
        from .memory.store import MemoryStore
        from .prompt import DEFAULT_SYSTEM

        self.loaded, self.root, self.policy, self.session = loaded, Path(root), policy, session
        self.method = method.folding()
        self.count_tokens = count_tokens
        self.store = MemoryStore(self.root)
        # The folded turns take no positions, so the window need only hold the prompt prefix and recent turns.
        self.config = EncodeConfig(system=system or DEFAULT_SYSTEM, reserve=policy.recent_tokens)
        self.budget = policy.budget_bytes or default_budget(loaded)
        self._attached: dict[str, tuple] = {}  # segment name → (manifest, KVMemory); segments never change

    # ------------------------------------------------------------------------------------ state

    def segments(self) -> list[Segment]:
        return sorted((s for s in map(Segment.parse, self.store.names()) if s), key=lambda s: s.first)

    def forgotten_through(self) -> int:
        """Seq of the last forgotten turn (0: none)."""
        try:
            state = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            raise BadInputError(f"{self.root / STATE}: unreadable history state ({e})") from None
        if state.get("format") != "combllama-session-history" or state.get("version") != 1:
            raise BadInputError(f"{self.root / STATE}: not a history state this combllama reads")
        return int(state["forgotten_through"])

    def _forget_through(self, seq: int) -> None:
        from .memory.durable import write_atomic

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"format": "combllama-session-history", "version": 1, "forgotten_through": seq}
        write_atomic(self.root / STATE, json.dumps(data).encode())

    def bytes(self) -> int:
        return sum(self.store.open(s.name).stats()["tensor_bytes"] for s in self.segments())

    def clear(self) -> None:
        """Forget every folded turn (the session's turns were cleared)."""
        self._attached.clear()
        if self.root.exists():
            shutil.rmtree(self.root)

    def _covered(self, turns: Sequence[tuple[int, str, str]]) -> int:
        """How many of `turns` (oldest first) are forgotten or held by segments. Segments that do not match
        the turns exactly (cleared, retried or edited history; another method, or an adapter the method no longer
        reads, such as a replaced shipped one; a crash between two steps of a compaction) are all removed: the
        turns fold again from scratch."""
        from ..ingest.transcript import transcript

        seqs = [seq for seq, _, _ in turns]
        gone = self.forgotten_through()
        n = sum(1 for s in seqs if s <= gone)
        for seg in self.segments():
            try:
                k = seqs.index(seg.last, n)
                reader = self.store.open(seg.name)
            except (ValueError, CombllamaError):
                k, reader = -1, None
            if (reader is None or seqs[n] != seg.first or not reader.complete
                    or reader.manifest["method"]["name"] != self.method.name
                    or reader.manifest["source"]["sha256"] != transcript(self.session, turns[n:k + 1]).sha256
                    or not self._attaches(seg, reader)):
                self.clear()
                return 0
            n = k + 1
        return n

    def _attaches(self, seg: Segment, reader) -> bool:
        """Whether the segment attaches (kept for parts(), which needs it attached anyway)."""
        from .errors import IncompatibleMemoryError
        from .fast.load import attach_reader

        if seg.name not in self._attached:
            try:
                self._attached[seg.name] = (reader.manifest, attach_reader(reader, self.loaded))
            except IncompatibleMemoryError:
                return False
        return True

    # ------------------------------------------------------------------------------------ sync

    def sync(self, turns: Sequence[tuple[int, str, str]]) -> SyncResult:
        """Fold what the policy says of `turns` (the session's whole history, oldest first) and keep the
        memory within the budget. Returns how many turns the prompt no longer carries."""
        if not self.method.positionless:  # its memory would take the positions the turns take: nothing gained
            self.clear()
            return SyncResult(0, [], 0, self.budget)
        covered = self._covered(turns)
        tokens = [self.count_tokens(q, a) for _, q, a in turns]
        target = fold_point(tokens, covered, self.policy)
        events = []
        if target > covered:
            part = turns[covered:target]
            seg = Segment.of(part[0][0], part[-1][0], False)
            stats = self._encode(seg, part, self.method)
            events.append(Event("fold", seg.first, seg.last, sum(tokens[covered:target]), stats["tensor_bytes"]))
        total = self.bytes()
        while total > self.budget and self.segments():
            events.append(self._shrink(turns, total))
            total = self.bytes()
        return SyncResult(target, events, total, self.budget)

    def _shrink(self, turns, total: int) -> Event:
        """One step towards the budget: every folded turn encoded again, smaller, into one segment; or,
        where that cannot be done, the oldest segment forgotten."""
        from .methods import Budget, get_method

        segs = self.segments()
        readers = [self.store.open(s.name) for s in segs]
        fixed = [self.method.fixed_bytes(r.manifest) for r in readers]  # e.g. the prompt prefix, once per memory
        raw = sum((r.stats()["tensor_bytes"] - f) / _fraction(r.manifest) for r, f in zip(readers, fixed))
        fraction = min(1.0, (self.budget / 2 - max(fixed)) / max(raw, 1))  # one merged memory, at fraction 1 = raw
        if self.method.prunes and fraction >= self.policy.min_fraction:
            gone = self.forgotten_through()
            live = [t for t in turns if gone < t[0] <= segs[-1].last]
            seg = Segment.of(live[0][0], live[-1][0], True)
            method = get_method(self.method.name, self.method.options.to_json(), Budget(fraction=fraction))
            stats = self._encode(seg, live, method)
            for old in segs:
                if old.name != seg.name:
                    self.store.remove(old.name)
            return Event("compact", seg.first, seg.last, sum(self.count_tokens(q, a) for _, q, a in live),
                         stats["tensor_bytes"], fraction)
        old, size = segs[0], readers[0].stats()["tensor_bytes"]
        self._forget_through(old.last)  # first: a crash before the removal refolds, never resurrects
        self.store.remove(old.name)
        return Event("forget", old.first, old.last, bytes=size)

    def _encode(self, seg: Segment, turns, method) -> dict:
        from ..ingest.transcript import transcript
        from .encode import ingest

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._attached.pop(seg.name, None)
        result = ingest(self.loaded, transcript(self.session, turns), method, self.store, name=seg.name,
                        config=self.config, force=True)
        return result.stats

    # ------------------------------------------------------------------------------------ attach

    def parts(self) -> list[tuple[str, dict, object]]:
        """(display name, manifest, attached memory) of each segment, oldest first, for chat.combine."""
        from .fast.load import attach_reader

        out = []
        segs = self.segments()
        for seg in segs:
            if seg.name not in self._attached:
                reader = self.store.open(seg.name)
                self._attached[seg.name] = (reader.manifest, attach_reader(reader, self.loaded))
            manifest, memory = self._attached[seg.name]
            out.append((f"history-{seg.first}-{seg.last}", manifest, memory))
        for name in set(self._attached) - {s.name for s in segs}:
            del self._attached[name]
        return out


def _fraction(manifest: dict) -> float:
    """The budget fraction a segment was encoded at (1 when none)."""
    budget = (manifest["method"].get("params") or {}).get("budget") or {}
    return float(budget.get("fraction") or 1.0)
