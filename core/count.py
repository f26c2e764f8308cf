"""Counting a Document's tokens with the model's own tokenizer, and sizing its memory per method, with
no model weights. Knows nothing of files on disk or of printing: the CLI renders what this returns.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CombllamaError
from .methods import METHODS, Budget, get_method
from .model import TokenizerInfo
from .prompt import defuse_document

BATCH_CHARS = 2_000_000  # characters tokenized per batch call: bounds the tokenizer's transient memory


@dataclass(frozen=True)
class SectionCount:
    path: str  # the section's origin path (a file of a repository, the document for single files)
    title: str | None
    chars: int
    tokens: int


@dataclass(frozen=True)
class DocumentCount:
    name: str
    kind: str
    tokens: int  # tokens of Document.joined(), as ingest tokenizes it
    prefix_tokens: int  # chat template and system prompt ahead of the document in every memory
    sections: list[SectionCount]

    @property
    def chars(self) -> int:
        return sum(s.chars for s in self.sections)


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    memory_tokens: int | None  # KV entries per layer the memory would keep; None when the method refuses
    bytes: int | None  # KV bytes plus the int32 token ids stored with every memory
    note: str = ""  # why the method refuses this document


def _cut_is_safe(pre, text: str, p: int, lo: int, hi: int, window: int = 64) -> bool:
    """Whether cutting `text` at p leaves the pre-tokens around p as one pass makes them.

    BPE merges never cross a pre-token boundary, so equal pre-tokens mean equal token ids. The check
    pre-tokenizes a window around p whole and in two halves; the regexes look ahead one character at
    most, so agreement in the window is agreement in the whole text.
    """
    a, b = max(lo, p - window), min(hi, p + window)
    whole = [t for t, _ in pre.pre_tokenize_str(text[a:b])]
    halves = [t for t, _ in pre.pre_tokenize_str(text[a:p])] + [t for t, _ in pre.pre_tokenize_str(text[p:b])]
    return whole == halves


def _pieces(tokenizer, text: str, starts: list[int]) -> list[tuple[int, int, int]]:
    """(a, b, section) pieces of `text` cut near section starts, each tokenizable on its own.

    A cut goes at a section start, or a few characters from it, where pre-tokenization says it is
    invisible to the tokenizer; where none is found nearby the section stays glued to the previous
    piece. Without a pre-tokenizer to ask (slow tokenizers), cuts go at section starts and the total
    may differ from one pass by a token or so per section.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None and backend.normalizer is None else None
    cuts = [(0, 0)]
    for i, s in enumerate(starts[1:], start=1):
        if pre is None:
            cuts.append((s, i))
            continue
        lo, hi = cuts[-1][0] + 1, starts[i + 1] if i + 1 < len(starts) else len(text)
        for d in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            p = s + d
            if lo <= p < hi and _cut_is_safe(pre, text, p, lo - 1, hi):
                cuts.append((p, i))
                break
    bounds = [c for c, _ in cuts] + [len(text)]
    return [(bounds[k], bounds[k + 1], cuts[k][1]) for k in range(len(cuts))]


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    # Counted as tokenize_document encodes: delimiters defused, special-token look-alikes spelled out.
    texts = [defuse_document(t) for t in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        # No Python lists of ids; the _fast variant also skips offsets (~10% faster).
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        before, backend.encode_special_tokens = backend.encode_special_tokens, True
        try:
            return [len(e) for e in encode(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def count_document(tokenizer, document, batch_chars: int = BATCH_CHARS) -> DocumentCount:
    """Tokens of `document` overall and per section (a section's count includes the separator after it)."""
    from .prompt import memory_prefix_ids

    text = document.joined()
    starts = document.section_starts()
    pieces = _pieces(tokenizer, text, starts)
    lengths: list[int] = []
    batch: list[str] = []
    size = 0
    for a, b, _ in pieces:
        batch.append(text[a:b])
        size += b - a
        if size >= batch_chars:
            lengths += _lengths(tokenizer, batch)
            batch, size = [], 0
    if batch:
        lengths += _lengths(tokenizer, batch)
    # A glued piece is credited to its first section; the sections glued to it show 0 tokens.
    by_section = {i: n for (_, _, i), n in zip(pieces, lengths)}
    sections = []
    for i, sec in enumerate(document.sections):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        sections.append(SectionCount(sec.origin.path, sec.origin.title, end - starts[i], by_section.get(i, 0)))
    return DocumentCount(document.name, document.kind, sum(lengths), len(memory_prefix_ids(tokenizer)), sections)


def estimate_memory(info: TokenizerInfo, doc_tokens: int, prefix_tokens: int, budget: Budget | None = None,
                    reserve: int | None = None) -> list[MemoryEstimate]:
    """What each registered method would keep of a document, and its size on disk, from its own
    `select` and `memory_tokens` (so a new method is sized correctly without touching this)."""
    from .encode import EncodeConfig

    reserve = EncodeConfig().reserve if reserve is None else reserve
    out = []
    for name in METHODS:
        try:
            method = get_method(name, None, budget)
            a, b = method.select(prefix_tokens, doc_tokens, info.window, reserve)
        except CombllamaError as e:
            out.append(MemoryEstimate(name, None, None, str(e)))
            continue
        stored = prefix_tokens + (b - a)
        kept = method.memory_tokens(stored)
        out.append(MemoryEstimate(name, kept, kept * info.kv_bytes_per_token + 4 * stored))
    return out
