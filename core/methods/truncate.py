"""`truncate`: keep only the last document tokens that fit the window — what a naive user gets.

The kept tail is encoded on its own from position 0 (the text before it never existed), so it is
exactly plain inference over a truncated document. The baseline every compressing method must beat.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError
from .base import Method, Options
from .full import FullEncoder, attach_kv_chunks


class Truncate(Method):
    name = "truncate"
    summary = "keep only the last tokens that fit the window (--budget caps it further)"

    @dataclass(frozen=True)
    class Options(Options):
        pass

    def select(self, n_prefix, n_doc, window, reserve):
        room = window - n_prefix - reserve
        if room < 1:
            raise BadInputError(f"the model's {window}-token window leaves no room for the document")
        keep = min(n_doc, room, self.budget.of(n_doc) if self.budget else n_doc)
        return n_doc - keep, n_doc

    def encoder(self, model, total_tokens, reserve=0):
        return FullEncoder(model)

    def attach(self, model, manifest, blocks):
        self.check_memory(model, manifest)
        return attach_kv_chunks(model, manifest, self.checked_blocks(manifest, blocks))

    def memory_tokens(self, total_tokens):
        return total_tokens
