"""The method contract: how a memory is encoded chunk by chunk and attached for answering.

A method is a small class with a typed, validated `Options` dataclass, registered by name in
`core.methods.METHODS`. encode side: `select` picks the document tokens to keep, `encoder` returns a
stateful object that turns each chunk into the tensors to persist (and can be restored from the
committed ones on resume). attach side: `attach` turns verified CPU tensors into what the engine
reads. KV methods share `prefill` and `KVMemory`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Iterable

from ..errors import BadInputError, CorruptMemoryError


def host_available() -> int | None:
    """Bytes of host memory the kernel says are available without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Budget:
    """`--budget`: a fraction of the document (0 < f <= 1) or a number of tokens (an integer > 1)."""

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise BadInputError("a budget is either a fraction or a token count")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise BadInputError(f"budget fraction must be in (0, 1], got {self.fraction}")
        if self.tokens is not None and self.tokens < 1:
            raise BadInputError(f"budget must be at least 1 token, got {self.tokens}")

    @classmethod
    def parse(cls, text: str | float | int | None) -> "Budget | None":
        if text is None or text == "":
            return None
        s = str(text).strip()
        if re.fullmatch(r"\d+", s) and int(s) > 1:
            return cls(tokens=int(s))
        try:
            return cls(fraction=float(s))
        except ValueError:
            raise BadInputError(f"--budget must be a fraction like 0.25 or a token count like 4096, not {s!r}") from None

    def of(self, n: int) -> int:
        """Tokens this budget allows out of `n`."""
        return min(n, self.tokens) if self.tokens is not None else max(1, int(n * self.fraction))

    def to_json(self) -> dict:
        return {"fraction": self.fraction} if self.fraction is not None else {"tokens": self.tokens}


@dataclass
class KVMemory:
    """A memory attached as a transformers cache. `lengths[l]` is layer l's physical length (what the
    engine trims back to after each answer); `logical_length` is where positions continue."""

    cache: Any  # transformers DynamicCache
    logical_length: int
    lengths: list[int]
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)  # physical [a, b) per chunk, layer 0

    def pre_layer(self):
        """None, or f(layer index, hidden [1, T, d]) → hidden: what the memory adds before each decoder layer
        beyond its cache (CombLlama's cross blocks). A decoder that runs the layers itself (core/fast) calls
        it; transformers' forward gets the same through the cache's `attention_kwargs`."""
        return None


@dataclass(frozen=True)
class Options:
    """Base of every method's options; subclasses add typed fields with defaults."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Options":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known)) or 'none'})")
        return cls(**data)


class Encoder:
    """Turns chunks, in order, into tensors to persist."""

    def restore(self, chunk, tensors: dict) -> None:
        """Feed back a committed chunk when resuming (so the state equals an uninterrupted run)."""
        raise NotImplementedError

    def encode(self, chunk) -> dict | None:
        """Tensors to store for `chunk` (None: nothing stored for it)."""
        raise NotImplementedError


class Method:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    summary: ClassVar[str]
    kind: ClassVar[str] = "kv"  # what attach returns: "kv" → KVMemory
    positionless: ClassVar[bool] = False  # its memory takes no window positions: long chats fold turns into it
    prunes: ClassVar[bool] = False  # a --budget below 1 keeps fewer entries of every token span (history compaction)
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None, budget: Budget | None = None):
        self.options = options if options is not None else self.Options()
        self.budget = budget

    def folding(self) -> "Method":
        """The method a long chat folds its old turns with (core/history.py): this one, unless what suits a
        document does not suit turns that must free their positions."""
        return self

    def params(self) -> dict:
        """Everything that shapes the memory's contents (stored in the manifest, part of the content key)."""
        return {**self.options.to_json(), "budget": self.budget.to_json() if self.budget else None}

    def select(self, n_prefix: int, n_doc: int, window: int, reserve: int) -> tuple[int, int]:
        """Document token range [a, b) to encode. `reserve` tokens of the window stay free for the
        conversation. The default keeps everything."""
        return 0, n_doc

    def encoder(self, model, total_tokens: int, reserve: int = 0) -> Encoder:
        """The encoder of a `total_tokens` memory that must leave `reserve` window positions free for the
        conversation (EncodeConfig.reserve; only methods that lay positions out read it)."""
        raise NotImplementedError

    def attach(self, model, manifest: dict, blocks: Iterable[tuple[dict, dict]]):
        raise NotImplementedError

    # -- read-time checks: every attach runs check_memory first and reads its blocks through checked_blocks --
    def check_memory(self, model, manifest: dict) -> None:
        """CorruptMemoryError unless the memory's recorded geometry and every chunk's tensor specs fit `model`.

        From the manifest alone (the chunk files were checked against it), so a memory whose manifest and
        chunks agree with each other but not with the model is refused before anything is read or attached:
        a torch shape error, or a cache with the wrong number of layers, is never what the user sees."""
        L, H, D = kv_geometry(model)
        name = manifest.get("name")
        recorded = manifest.get("model") or {}
        for key, have in (("n_layers", L), ("n_kv_heads", H), ("head_dim", D)):
            if key in recorded and recorded[key] != have:
                raise CorruptMemoryError(f"{name}: manifest says model.{key} = {recorded[key]!r}, the model has "
                                         f"{have} (the memory does not fit the model its fingerprint names)")
        for record in manifest.get("chunks", ()):  # absent for blocks made in process (tests), never read from disk
            if record.get("file"):
                problem = self.spec_problem(record["tensors"], record["end"] - record["start"], (L, H, D))
                if problem:
                    raise CorruptMemoryError(f"{name} chunk {record['seq']}: {problem} (the model has {L} layers, "
                                             f"{H} KV heads, head dim {D})")

    def spec_problem(self, specs: dict, tokens: int, geometry: tuple[int, int, int]) -> str | None:
        """What is wrong with one chunk's tensor specs {name: [dtype, shape]} for a model of `geometry`
        (None: nothing). The default is the KV layout: "k", "v" [layers, kv_heads, tokens, head_dim]."""
        L, H, D = geometry
        return kv_spec_problem(specs, {"k": [L, H, tokens, D], "v": [L, H, tokens, D]})

    def check_block(self, record: dict, tensors: dict, manifest: dict) -> None:
        """CorruptMemoryError when the values of one verified chunk are out of the range the method can
        use (indices, counts, scales); finiteness is checked by the reader. The default has nothing to check."""

    def checked_blocks(self, manifest: dict, blocks: Iterable[tuple[dict, dict]]):
        """`blocks` with check_block run on each before the attach sees it (blocks without a manifest record
        were made in process, not read from disk)."""
        for record, tensors in blocks:
            if tensors and "seq" in record:
                self.check_block(record, tensors, manifest)
            yield record, tensors

    def check_resources(self, manifest: dict, device, dtype) -> None:
        """Raise ResourceError (exit 4) before anything is read when the memory cannot be attached on
        `device` (torch.device): planned from the manifest alone (core/memory/plan.py). Methods that place
        parts elsewhere (hcattention: values in host memory) override this with their own split."""
        from ..memory.plan import check_attach

        if device.type == "cuda":
            import torch

            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = host_available()
            if free is None:
                return
        check_attach(manifest, free, device.type, dtype_bytes=dtype.itemsize)

    def memory_tokens(self, total_tokens: int) -> int:
        """Estimated KV entries kept per layer for a memory of `total_tokens` (for size planning)."""
        return total_tokens

    def fixed_bytes(self, manifest: dict) -> int:
        """Tensor bytes of a written memory that neither its length nor its budget scale (history compaction)."""
        return 0

    def layout(self, total_tokens: int, window: int, reserve: int) -> str:
        """Position layout recorded in the manifest: "original" (stored positions are used as they are) or
        "compact" (attach re-rotates keys to positions that fit the window)."""
        return "original"


FLOATS = ("F32", "F16", "BF16")


def kv_geometry(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Llama-family transformers model."""
    c = model.config
    return (int(c.num_hidden_layers), int(c.num_key_value_heads),
            int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads))


def kv_spec_problem(specs: dict, shapes: dict[str, list[int]], dtypes=FLOATS) -> str | None:
    """Exactly the tensors of `shapes`, each a `dtypes` tensor of that shape (None: they are)."""
    if set(specs) != set(shapes):
        return f"tensors {sorted(specs)}, expected {sorted(shapes)}"
    for name, shape in shapes.items():
        dtype, have = specs[name]
        if dtype not in dtypes or list(have) != shape:
            return f"tensor {name!r} is {dtype} {list(have)}, expected {'/'.join(dtypes)} {shape}"
    return None


def prefill(model, ids: list[int], cache, start_pos: int, physical_start: int | None = None,
            all_logits: bool = False):
    """Run `ids` through the model on top of `cache` at positions start_pos.. and return the logits
    of the last token [vocab] (or of every token [len(ids), vocab] with `all_logits`, for teacher
    forcing). Positions are explicit because compressed caches are shorter than the text."""
    import torch

    device = model.device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    phys = cache.get_seq_length() if physical_start is None else physical_start
    pos = torch.arange(start_pos, start_pos + len(ids), device=device)[None]
    cpos = torch.arange(phys, phys + len(ids), device=device)
    with torch.inference_mode():
        # A cache may carry attention kwargs (a ragged memory's key masks, see methods/kvcompose.py).
        extra = getattr(cache, "attention_kwargs", None) or {}
        out = model(input_ids=x, past_key_values=cache, position_ids=pos, cache_position=cpos, use_cache=True,
                    logits_to_keep=0 if all_logits else 1, **extra)
    return out.logits[0] if all_logits else out.logits[0, -1]


def layer_kv(cache, layer: int):
    """(keys, values) of one cache layer, each [batch, kv_heads, seq, head_dim]."""
    lay = cache.layers[layer]
    return lay.keys, lay.values


def make_cache(kv: list[tuple[Any, Any]]):
    """A DynamicCache holding the given per-layer (keys, values), each [1, kv_heads, seq, head_dim]."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def trim_cache(cache, lengths: list[int]) -> None:
    """Cut every layer back to its memory length (drop the question and answer of the last turn)."""
    for lay, n in zip(cache.layers, lengths):
        if lay.keys is not None and lay.keys.shape[-2] > n:
            lay.keys = lay.keys[:, :, :n]
            lay.values = lay.values[:, :, :n]
