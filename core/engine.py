"""The engine: a memory attached as a cache, question ids in, answer token ids out, streamed.

It knows nothing about text, files or terminals (nanochat's rule). Positions continue from the
memory's logical length; after every answer — finished, stopped or interrupted — the cache is cut
back to the memory, so one attached memory serves any number of questions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .errors import BadInputError, ResourceError
from .methods.base import KVMemory, prefill, trim_cache
from .sampling import sample

GREEDY_BURST = 4  # greedy tokens per CUDA-graph replay (fast path): one host sync per 4, streamed at once


def is_out_of_memory(e: BaseException) -> bool:
    """A device (torch.OutOfMemoryError) or host allocation failure raised by a tensor op."""
    import torch

    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def release_device_memory() -> None:
    """Return freed blocks to the device after an out-of-memory error (call it outside the except
    block, once the exception and its frames are gone: they hold tensors)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise BadInputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise BadInputError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise BadInputError("top_p must be in (0, 1]")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the call to the first yielded token
    stop: str = ""  # "eos" | "length" | "interrupted"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        pf = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else None
        dc = (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds and self.new_tokens > 1 else None
        return {"prompt_tokens": self.prompt_tokens, "prefill_s": round(self.prefill_seconds, 4),
                "prefill_tok_s": round(pf, 1) if pf else None, "new_tokens": self.new_tokens,
                "decode_s": round(self.decode_seconds, 4), "decode_tok_s": round(dc, 1) if dc else None,
                "first_token_s": round(self.first_token_seconds, 4), "stop": self.stop}


class Engine:
    """`fast`: None (default) takes core/fast's static-cache, CUDA-graph path when the model is on CUDA and
    the memory is a plain cache of equal-length layers, unless COMBLLAMA_FAST=0 (an escape hatch); True
    takes it wherever it applies (on a CPU without graphs); False never does. The path's GPU tests:
    tests/gpu/test_fast_gpu.py (H100 run: bench/results/gpu/gpu-tests-h100.txt)."""

    def __init__(self, model, memory: KVMemory, eos_ids: list[int], fast: bool | None = None):
        self.model, self.memory, self.eos_ids = model, memory, set(eos_ids)
        self.fast = fast
        self.stats = GenerationStats()

    def _fast_decoder(self, capacity: int):
        """core/fast's decoder for this memory, or None when the plain path answers."""
        import os

        if self.fast is False:
            return None
        if self.fast is None and (self.model.device.type != "cuda" or os.environ.get("COMBLLAMA_FAST") == "0"):
            return None
        from .fast.decode import eligible, fast_decoder
        from .fast.static_cache import uniform_length

        if eligible(self.model) is not None or uniform_length(self.memory) is None:
            return None
        return fast_decoder(self.model, self.memory, capacity)

    @property
    def window(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def generate(self, ids: list[int], options: GenerateOptions = GenerateOptions()) -> Iterator[int]:
        """Yield answer token ids for prompt `ids` (which follow the memory). EOS is not yielded."""
        import torch

        mem = self.memory
        room = self.window - mem.logical_length - len(ids)
        if room < 1:
            raise BadInputError(f"the question and history ({len(ids):,} tokens) do not fit the model's window "
                                f"after the memory ({mem.logical_length:,} of {self.window:,} positions)")
        budget = min(options.max_new_tokens, room)
        gen = torch.Generator(device="cpu")
        if options.seed is not None:
            gen.manual_seed(options.seed)
        self.stats = st = GenerationStats(prompt_tokens=len(ids), stop="interrupted")
        t0 = time.perf_counter()
        pos = mem.logical_length
        phys = mem.lengths[0]
        # Greedy on a CUDA graph: tokens come from the device GREEDY_BURST at a time (one sync per burst).
        fast = self._fast_decoder(len(ids) + budget + GREEDY_BURST)
        burst = GREEDY_BURST if fast is not None and fast.use_graph and options.temperature <= 0 else 0
        queue: list[int] = []
        st.extra["path"] = "plain" if fast is None else f"fast ({fast.backend}{', unified decode' if fast.unified else ''}{', cuda graph' if fast.use_graph else ''})"
        oom = False
        try:
            logits = prefill(self.model, ids, mem.cache, pos, phys) if fast is None else fast.prefill(ids, pos)
            pos, phys = pos + len(ids), phys + len(ids)
            st.prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(budget):
                # Greedy picks on the device (the same argmax) and copies one integer, not the vocabulary.
                token = queue.pop(0) if queue else sample(logits if options.temperature <= 0 else logits.float().cpu(),
                                                          options.temperature, options.top_p, gen)
                if token in self.eos_ids:
                    st.stop = "eos"
                    break
                st.new_tokens += 1
                if i == 0:
                    st.first_token_seconds = time.perf_counter() - t0
                yield token
                if i + 1 == budget:
                    st.stop = "length"
                    break
                if queue:
                    continue  # the burst already fed this token
                if fast is None:
                    logits = prefill(self.model, [token], mem.cache, pos, phys)
                elif burst:
                    queue = fast.greedy_steps(token, pos, burst)  # feeds token, picks the next `burst`
                    pos, phys = pos + burst - 1, phys + burst - 1
                else:
                    logits = fast.step(token, pos)
                pos, phys = pos + 1, phys + 1
            st.decode_seconds = time.perf_counter() - t1
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            oom = True  # reported below, once the exception (whose frames hold tensors) is gone
        finally:
            if fast is None:
                trim_cache(mem.cache, mem.lengths)
            else:
                fast.static.reset()
        if oom:
            logits = None
            release_device_memory()
            st.stop = "out-of-memory"
            raise ResourceError(
                f"out of {'GPU ' if self.model.device.type == 'cuda' else ''}memory answering: the memory holds "
                f"{mem.logical_length:,} positions and the question and history {len(ids):,} tokens; ask a shorter "
                f"question, clear the chat history, lower --max-tokens, or use a memory made with a smaller --budget "
                f"or a compressing method. The memory is still attached: the next question can be asked")
