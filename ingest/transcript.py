"""A chat transcript as a Document: the turns a long chat folds into its session memory.

One section per turn ("User: …\nAssistant: …"), cited as `session NAME "turn N"`. Pure stdlib, like every
source; what a session is and when turns fold is core's business (core/history.py).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from .document import Document, Origin, Section


def turn_text(question: str, answer: str) -> str:
    return f"User: {question.strip()}\nAssistant: {answer.strip()}"


def transcript(session: str, turns: Sequence[tuple[int, str, str]]) -> Document:
    """The Document of `turns` (seq, question, answer), oldest first, of the session named `session`."""
    sections = [Section(turn_text(q, a), Origin(path=f"session {session}", title=f"turn {seq}"))
                for seq, q, a in turns]
    digest = hashlib.sha256()
    for seq, q, a in turns:
        digest.update(f"{seq}\x00{q}\x00{a}\x01".encode())
    first, last = (turns[0][0], turns[-1][0]) if turns else (0, 0)
    return Document(f"{session} turns {first}-{last}", "chat", sections, digest.hexdigest())
