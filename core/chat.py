"""A conversation over attached memories: lay their KV caches side by side, fit the history into the
window, answer through the engine and attribute each answer to chunks. No printing, no sessions.

Several memories are concatenated in attach order. Each was encoded alone from position 0, so the
keys of memory i are re-rotated (RoPE is a rotation: R(p + Δ)k = R(Δ)R(p)k, exact) to follow the
memories before it; the question then sees [memory 1][memory 2]...[turn] at consecutive positions.
What stays approximate — and is documented, not hidden — is that a memory's entries never attended
to the other memories (each document was read on its own). Memories that together leave less than
`reserve` positions for the conversation are not combined: the latest ones that fit are active.
A memory type with its own `concat` (CombLlama: cross memory, which takes no positions) joins its kind
its own way; caches carrying other attention inputs cannot join, and the latest memory answers alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .cite import CiteOptions, attention_mass, rank, span_shares
from .engine import Engine, GenerateOptions
from .errors import BadInputError, IncompatibleMemoryError
from .methods.base import KVMemory, make_cache, prefill
from .prompt import DEFAULT_SYSTEM, Turn, memory_prefix_ids, turn_ids

RESERVE = 1024  # positions kept free for the conversation when memories are combined (EncodeConfig.reserve)
ANSWER_ROOM = 256  # positions kept for the answer when the history is fitted (or max_tokens, if smaller)


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of one attached memory, as its manifest describes it."""

    memory: str
    seq: int
    parts: list  # manifest chunks[seq]["source"]: [{"path", "lines"|"pages"|"title"}...]


@dataclass
class Attached:
    """The memories an answer reads, laid out in one cache."""

    memory: KVMemory
    names: list[str]  # active memories, in order
    inactive: list[str] = field(default_factory=list)  # attached but left out (window)
    apart: list[str] = field(default_factory=list)  # attached but left out (a kind of memory the others cannot join)
    tokens: dict[str, int] = field(default_factory=dict)  # logical tokens per active memory
    chunks: list[ChunkRef] = field(default_factory=list)  # one per cite span
    cite_spans: list[tuple[int, int]] = field(default_factory=list)  # physical [a, b): chunks minus prompt prefix


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    history: list[Turn]  # the turns that fit, oldest first
    dropped: int  # oldest turns left out to fit the window
    history_tokens: int
    question_tokens: int


def choose_active(lengths: Sequence[int], window: int, reserve: int = RESERVE) -> list[int]:
    """Indices (in order) of the memories read together: all if they fit `window - reserve`, else the
    latest ones that do (at least the last one: a single memory was already checked at ingest)."""
    keep, total = [], 0
    for i in range(len(lengths) - 1, -1, -1):
        if keep and total + lengths[i] + reserve > window:
            break
        keep.append(i)
        total += lengths[i]
    return sorted(keep)


def shift_keys(keys, delta: int, rotary):
    """Re-rotate post-RoPE keys [B, H, S, D] by `delta` positions with the model's rotary embedding."""
    import torch

    from .cite import apply_rope

    pos = torch.full((1, keys.shape[2]), delta, dtype=torch.long, device=keys.device)
    cos, sin = rotary(keys, pos)  # [1, S, D] each
    return apply_rope(keys, cos, sin)


def bare_memory(loaded, system: str = DEFAULT_SYSTEM) -> KVMemory:
    """A memory of the prompt prefix alone: a chat with no document attached."""
    ids = memory_prefix_ids(loaded.tokenizer, system)
    cache = make_cache([])
    prefill(loaded.model, ids, cache, 0, 0)
    n = cache.get_seq_length()
    return KVMemory(cache, len(ids), [n] * len(cache.layers), [])


def combine(loaded, parts: Sequence[tuple[str, dict, KVMemory]], reserve: int = RESERVE) -> Attached:
    """One Attached from (name, manifest, attached KVMemory) triples, in attach order."""
    import torch

    if not parts:
        return Attached(bare_memory(loaded), [])
    active = choose_active([m.logical_length for _, _, m in parts], loaded.window, reserve)
    chosen = [parts[i] for i in active]
    inactive = [parts[i][0] for i in range(len(parts)) if i not in active]
    if len(chosen) > 1:
        rotary = loaded.model.model.rotary_emb
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            # Scaled RoPE variants (YaRN, LongRoPE) do not compose by rotation alone.
            inactive += [name for name, _, _ in chosen[:-1]]
            chosen = chosen[-1:]
    apart: list[str] = []
    if len(chosen) > 1:
        kinds = {type(m) for _, _, m in chosen}
        own = getattr(next(iter(kinds)), "concat", None) if len(kinds) == 1 else None
        plain = kinds == {KVMemory} and not any(getattr(m.cache, "attention_kwargs", None) for _, _, m in chosen)
        if own:
            try:
                out = Attached(own([m for _, _, m in chosen]), [n for n, _, _ in chosen], inactive)
                out.tokens = {name: m.logical_length for name, _, m in chosen}
                return out
            except IncompatibleMemoryError:  # e.g. CombLlama memories of two adapters
                pass
        if not plain:
            # Caches that carry attention inputs (cross memory, key masks, a host store) only join their own
            # kind; the latest memory answers alone.
            apart = [name for name, _, _ in chosen[:-1]]
            chosen = chosen[-1:]
    out = Attached(chosen[0][2], [n for n, _, _ in chosen], inactive, apart)
    logical = physical = 0
    layers_k: list[list] = []
    layers_v: list[list] = []
    for name, manifest, mem in chosen:
        out.tokens[name] = mem.logical_length
        prefix = int(manifest.get("prompt", {}).get("prefix_tokens", 0))
        records = manifest.get("chunks", [])
        if len(records) == len(mem.chunk_spans):
            for rec, (a, b) in zip(records, mem.chunk_spans):
                # The prompt prefix is an attention sink: never a source. Only uncompressed chunks
                # (physical length = logical length) can be cut at it exactly.
                if b - a == rec["end"] - rec["start"] and rec["start"] < prefix:
                    a = min(b, a + prefix - rec["start"])
                if b > a:
                    out.chunks.append(ChunkRef(name, rec["seq"], rec.get("source") or []))
                    out.cite_spans.append((physical + a, physical + b))
        if len(chosen) > 1:
            for i, lay in enumerate(mem.cache.layers):
                if i == len(layers_k):
                    layers_k.append([])
                    layers_v.append([])
                k = lay.keys[:, :, :mem.lengths[i]]
                layers_k[i].append(shift_keys(k, logical, rotary) if logical else k)
                layers_v[i].append(lay.values[:, :, :mem.lengths[i]])
        logical += mem.logical_length
        physical += mem.lengths[0]
    if len(chosen) > 1:
        kv = [(torch.cat(k, dim=2), torch.cat(v, dim=2)) for k, v in zip(layers_k, layers_v)]
        out.memory = KVMemory(make_cache(kv), logical, [k.shape[2] for k, _ in kv], [])
    return out


class Conversation:
    """Answers questions over an Attached memory; the caller keeps the transcript."""

    def __init__(self, loaded, attached: Attached):
        self.loaded, self.attached = loaded, attached
        self.engine = Engine(loaded.model, attached.memory, loaded.eos_ids)

    @property
    def room(self) -> int:
        """Positions left for history, question and answer."""
        return self.loaded.window - self.attached.memory.logical_length

    def prompt(self, question: str, history: Sequence[Turn] = (), instructions: str = "",
               max_new_tokens: int = 512) -> Prompt:
        """Prompt ids for `question` after as many of the latest turns as fit, keeping room for the answer."""
        tok = self.loaded.tokenizer
        bare = turn_ids(tok, question, [], instructions=instructions)
        limit = self.room - min(max_new_tokens, ANSWER_ROOM)
        if len(bare) + 1 > self.room:
            raise BadInputError(f"the question ({len(bare):,} tokens) does not fit the {self.room:,} positions "
                                f"left after the memory")
        history = list(history)
        dropped = 0
        ids = turn_ids(tok, question, history, instructions=instructions)
        while history and len(ids) > limit:
            history.pop(0)
            dropped += 1
            ids = turn_ids(tok, question, history, instructions=instructions)
        return Prompt(ids, history, dropped, len(ids) - len(bare), len(bare))

    def generate(self, ids: list[int], options: GenerateOptions) -> Iterator[int]:
        return self.engine.generate(ids, options)

    def cite(self, prompt_ids: Sequence[int], answer_ids: Sequence[int],
             options: CiteOptions = CiteOptions()) -> list[tuple[ChunkRef, float]]:
        """The chunks the answer drew on, best first, with their share of the attention paid to them."""
        a = self.attached
        if not answer_ids or not a.cite_spans:
            return []
        mass = attention_mass(self.loaded.model, a.memory, prompt_ids, answer_ids, options.layers,
                              options.query_block)
        return [(a.chunks[i], share) for i, share in rank(span_shares(mass, a.cite_spans), options)]
