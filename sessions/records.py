"""The records the sessions store hands out: frozen dataclasses with `to_dict()` for the CLI's --json.

Plain data only: no SQLite, no I/O. Frozen means a field cannot be reassigned; the dicts and lists in a
record are fresh copies of what is stored, so changing one changes nothing on disk.

The JSON shapes below are a public interface (scripts parse
`combllama sessions ... --json`); add keys freely, never rename or remove one.

MemoryRef.to_dict():
    {"name": str,                   # the memory's name when it was attached
     "key": str | null}             # the memory's content key (e.g. its sha256), null if unknown

Session.to_dict():
    {"id": str,                     # ULID, 26 chars, sorts by creation time
     "name": str,                   # unique (case-insensitively) human slug
     "auto_named": bool,            # true while the name is a placeholder the first question replaces
     "created_at": str,             # UTC ISO 8601, "2026-05-09T07:35:25.123456Z"
     "updated_at": str,             # same format; changes on every write to the session
     "model": str | null,           # model name or path as the user gave it
     "model_fingerprint": str | null,
     "system": str | null,          # system prompt
     "settings": {str: any},        # generation settings: temperature, top_p, max_tokens, cite, ...
     "memories": [MemoryRef...],    # attached memories, in attach order
     "turn_count": int}

Turn.to_dict():
    {"id": str,                     # ULID of the turn
     "session_id": str,
     "seq": int,                    # 1, 2, 3 ... contiguous within a session (restarts after clear)
     "question": str,
     "answer": str,                 # partial if interrupted
     "sources": [{...}],            # as the engine gave them: {"doc","path","page_label","pages","lines"}
     "usage": {str: any},           # {"question_tokens","memory_tokens","history_tokens","output_tokens"}
     "timings": {str: any},         # {"load_ms","prefill_ms","decode_ms","decode_tok_s"}
     "interrupted": bool,
     "created_at": str}

SearchHit.to_dict():
    {"session_id": str, "session": str,   # the session's current name
     "snippet": str,                # a short excerpt around the match, "…" where cut
     "turn": Turn.to_dict()}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MemoryRef:
    """A memory a session reads from. The session never modifies the memory itself."""

    name: str
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key}


@dataclass(frozen=True)
class Session:
    id: str
    name: str
    created_at: str
    updated_at: str
    model: str | None = None
    model_fingerprint: str | None = None
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    memories: tuple[MemoryRef, ...] = ()
    turn_count: int = 0
    auto_named: bool = False

    @property
    def memory_names(self) -> list[str]:
        return [m.name for m in self.memories]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "auto_named": self.auto_named,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "system": self.system,
            "settings": dict(self.settings),
            "memories": [m.to_dict() for m in self.memories],
            "turn_count": self.turn_count,
        }


@dataclass(frozen=True)
class Turn:
    id: str
    session_id: str
    seq: int
    question: str
    answer: str
    sources: list[Any] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "seq": self.seq,
            "question": self.question,
            "answer": self.answer,
            "sources": list(self.sources),
            "usage": dict(self.usage),
            "timings": dict(self.timings),
            "interrupted": self.interrupted,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class SearchHit:
    session_id: str
    session_name: str
    turn: Turn
    snippet: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "session": self.session_name, "snippet": self.snippet,
                "turn": self.turn.to_dict()}
