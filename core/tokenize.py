"""Tokenize a Document once with the model's tokenizer and cut the ids into chunks that map back to
source spans. Pure apart from the tokenizer call; no model weights needed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import BadInputError
from .prompt import defuse_document


@dataclass(frozen=True)
class TokenizedDocument:
    ids: list[int]  # document tokens only (no template)
    offsets: list[tuple[int, int]]  # character span of each token in document.joined()
    line_starts: frozenset[int]  # token indices that begin a new line: preferred chunk boundaries


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of the memory sequence (prefix + selected document tokens)."""

    seq: int
    start: int
    end: int
    ids: tuple[int, ...]

    @property
    def tokens_sha256(self) -> str:
        return ids_sha256(self.ids)


def ids_sha256(ids) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def tokenize_document(tokenizer, text: str) -> TokenizedDocument:
    if not text.strip():
        raise BadInputError("the document has no text")
    # Document text is data: '<|im_start|>' in it is spelled out in ordinary tokens, never the control
    # token (split_special_tokens), and our own delimiters in it are defused (same length: offsets hold).
    enc = tokenizer(defuse_document(text), add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                    split_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    line_starts = frozenset(i for i, (a, _) in enumerate(offsets) if a > 0 and text[a - 1] == "\n")
    return TokenizedDocument(ids, offsets, line_starts)


def plan_chunks(n_tokens: int, chunk_tokens: int, boundaries: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Split [0, n_tokens) into spans of at most `chunk_tokens`, ending a span at a line start when
    one falls in its last quarter (so chunks, and therefore citations, follow the text's lines)."""
    if chunk_tokens < 16:
        raise BadInputError(f"--chunk-tokens must be at least 16 (got {chunk_tokens})")
    spans, start = [], 0
    while start < n_tokens:
        end = min(start + chunk_tokens, n_tokens)
        if end < n_tokens:
            for cut in range(end, start + (3 * chunk_tokens) // 4, -1):
                if cut in boundaries:
                    end = cut
                    break
        spans.append((start, end))
        start = end
    return spans


class StreamDecoder:
    """Token ids → text deltas for streaming, without splitting multi-byte characters: decode the
    pending ids and emit only once the text no longer ends in a replacement character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.emitted = text[self.emitted:], len(text)
        return delta
