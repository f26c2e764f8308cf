"""Identifiers and names of sessions: ULIDs made with the stdlib, human slugs, UTC timestamps.

Knows nothing of SQLite; the store decides uniqueness.
"""
from __future__ import annotations

import os
import re
import threading
import time
import unicodedata
from datetime import datetime, timezone

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_NAME = 64
# A name is one "word" of letters/digits (any script) joined by . _ -; it starts with a letter or digit
# so it can never read as an option (`-x`) or a hidden path.
_NAME = re.compile(r"[^\W_][\w.-]*\Z")
_SLUG_SEP = re.compile(r"[\W_]+")

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def new_ulid(now_ms: int | None = None) -> str:
    """A 26-character ULID: 48-bit ms timestamp + 80 random bits, Crockford base32.

    Monotonic within a process (inside one millisecond, or if the clock steps back, the random part is
    incremented), so ids made here sort in creation order; across processes they sort by millisecond,
    then at random.
    """
    global _last_ms, _last_rand
    if now_ms is not None:  # an explicit time (tests) neither reads nor moves the monotonic state
        ms, rand = now_ms, int.from_bytes(os.urandom(10), "big")
    else:
        with _lock:
            ms = int(time.time() * 1000)
            if ms <= _last_ms and _last_rand < (1 << 80) - 1:
                ms, rand = _last_ms, _last_rand + 1
            else:
                rand = int.from_bytes(os.urandom(10), "big")
            _last_ms, _last_rand = ms, rand
    value = (ms << 80) | rand
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def looks_like_ulid(text: str) -> bool:
    """True for anything shaped like a ULID (names may not be, so get(name_or_id) is unambiguous)."""
    t = text.upper()
    return len(t) == 26 and t[0] in "01234567" and all(c in CROCKFORD for c in t)


def ulid_time(ulid: str) -> datetime:
    """The creation time encoded in a ULID (UTC)."""
    value = 0
    for c in ulid.upper():
        value = value * 32 + CROCKFORD.index(c)
    return datetime.fromtimestamp((value >> 80) / 1000, tz=timezone.utc)


def utc_now() -> str:
    """UTC ISO 8601 with microseconds and a Z; fixed width, so text order is time order."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_name(name: str) -> str | None:
    """None if `name` may be a session name, else why not (one short sentence)."""
    if not isinstance(name, str) or not name:
        return "a session name may not be empty"
    if len(name) > MAX_NAME:
        return f"a session name is at most {MAX_NAME} characters"
    if not _NAME.match(name):
        return "a session name is letters, digits, '.', '_' and '-', starting with a letter or digit"
    if looks_like_ulid(name):
        return "a session name may not look like a session id"
    return None


def slugify(text: str, max_len: int = 40, fallback: str = "chat") -> str:
    """A lowercase name from free text (a first question): words joined by '-', cut at a word end."""
    # "What's" → "whats", not "what-s"
    text = re.sub(r"(?<=\w)['\u2019](?=\w)", "", unicodedata.normalize("NFKC", text or "").lower())
    words = [w for w in _SLUG_SEP.split(text) if w]
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_len:
            if not slug:  # one very long word: cut it
                slug = word[:max_len]
            break
        slug = candidate
    if not slug or check_name(slug):
        slug = f"{slug}-{fallback}" if slug and not check_name(f"{slug}-{fallback}") else fallback
    return slug


def with_suffix(base: str, n: int) -> str:
    """`base-n`, with base shortened so the result is still a valid name."""
    suffix = f"-{n}"
    return base[: MAX_NAME - len(suffix)].rstrip(".-_") + suffix
