"""Citation accuracy: does the first chunk an answer cites hold the needle? A thin adapter over
core.cite (ranking chunks by the attention share the answer paid them); when core has no cite
module the task reports "unavailable" instead of a number."""
from __future__ import annotations

import importlib

from ..core.errors import BadInputError
from ..core.tokenize import tokenize_document


def backend():
    """core.cite when it offers attention_mass / span_shares / rank, else None."""
    try:
        mod = importlib.import_module("combllama.core.cite")
    except ImportError:
        return None
    return mod if all(hasattr(mod, f) for f in ("attention_mass", "span_shares", "rank")) else None


def needle_chunk(loaded, manifest: dict, prepared) -> int | None:
    """Index of the memory chunk holding the needle's first token (None: not in the memory)."""
    case = prepared.case
    at = case.document.find(case.needle) if case.needle else -1
    if at < 0:
        return None
    tok = tokenize_document(loaded.tokenizer, prepared.document.joined())
    t = next((i for i, (a, b) in enumerate(tok.offsets) if b > at), None)
    a, b = manifest["source"]["doc_start"], manifest["source"]["doc_end"]
    if t is None or not a <= t < b:
        return None
    seq = manifest["prompt"]["prefix_tokens"] + t - a
    for i, c in enumerate(manifest["chunks"]):
        if c["start"] <= seq < c["end"]:
            return i
    return None


def first_source(loaded, memory, manifest: dict, prepared, answer_ids: list[int]) -> dict:
    """{"status", "first", "needle_chunk", "hit"} for one answer."""
    cite = backend()
    if cite is None:
        return {"status": "unavailable", "reason": "core.cite is not present"}
    if len(memory.chunk_spans) != len(manifest["chunks"]):
        return {"status": "unavailable", "reason": "memory chunks do not map one to one onto stored spans"}
    try:
        mass = cite.attention_mass(loaded.model, memory, prepared.question_ids, answer_ids)
    except BadInputError as e:  # a memory core cannot cite (e.g. layers of different lengths): not a 0
        return {"status": "unavailable", "reason": str(e)}
    ranked = cite.rank(cite.span_shares(mass, memory.chunk_spans))
    first = ranked[0][0] if ranked else None
    want = needle_chunk(loaded, manifest, prepared)
    return {"status": "ok", "first": first, "needle_chunk": want, "chunks": len(memory.chunk_spans),
            "hit": first is not None and first == want}
