"""Runs combllama methods on cases through core's public path: plan_memory → ingest into a temporary
MemoryStore → from_manifest().attach → prefill (teacher forcing) or Engine (answers).

The memory fraction is measured from the attached memory (KV entries it holds), never assumed.
Nothing here knows a method by name: any method registered in core.methods.METHODS runs.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.encode import EncodeConfig, ingest, plan_memory
from ..core.engine import Engine, GenerateOptions
from ..core.errors import CombllamaError
from ..core.memory.store import MemoryStore
from ..core.methods import Budget, KVMemory, from_manifest, get_method
from ..core.prompt import turn_ids
from ..core.tokenize import tokenize_document
from ..ingest import Document, Origin, Section
from . import citation
from .cases import CHUNK_TOKENS, CONTINUATION, Case
from .metrics import nll_stats, token_stats

# Window positions kept free after the memory: the 256 teacher-forced tokens or a question + answer.
RESERVE = CONTINUATION + 64


@dataclass
class Prepared:
    """What every method needs of one case, computed once: ids and the full-context reference."""

    case: Case
    document: Document
    memory_ids: list[int]  # prefix + the whole document (what `full` stores)
    continuation_ids: list[int]  # CONTINUATION + 1 tokens (fidelity)
    question_ids: list[int]  # generation tasks
    fits: bool  # memory + reserve fits the window: a full-context reference exists
    ref_logits: object = None  # [CONTINUATION, vocab] full-context logits (fidelity, when fits)


def document_of(case: Case) -> Document:
    return Document(f"{case.id}.txt", "text", [Section(case.document, Origin(f"{case.id}.txt", 1))],
                    hashlib.sha256(case.document.encode()).hexdigest())


def config(chunk_tokens: int = CHUNK_TOKENS) -> EncodeConfig:
    return EncodeConfig(chunk_tokens=chunk_tokens, reserve=RESERVE)


def prepare(loaded, case: Case) -> Prepared:
    """Ids of the memory as `full` would store it, the continuation / question ids, and the
    full-context reference logits (one plain forward over memory + continuation)."""
    import torch

    doc = document_of(case)
    plan = plan_memory(loaded, doc, get_method("truncate"), EncodeConfig(chunk_tokens=CHUNK_TOKENS, reserve=16))
    n_doc = plan.doc_tokens
    memory_ids = plan.ids if plan.doc_range == (0, n_doc) else None
    if memory_ids is None:  # longer than the window: rebuild the ids of the whole document
        memory_ids = plan.ids[:plan.n_prefix] + tokenize_document(loaded.tokenizer, doc.joined()).ids
    tok = loaded.tokenizer
    cont = tok(case.continuation, add_special_tokens=False)["input_ids"][:CONTINUATION + 1] if case.continuation else []
    question = turn_ids(tok, case.question) if case.question else []
    fits = len(memory_ids) + RESERVE <= loaded.window
    p = Prepared(case, doc, memory_ids, cont, question, fits)
    if case.task == "fidelity" and fits:
        with torch.inference_mode():
            x = torch.tensor([memory_ids + cont[:-1]], device=loaded.model.device)
            logits = loaded.model(input_ids=x, logits_to_keep=len(cont) - 1).logits[0]  # [CONTINUATION, V]
        p.ref_logits = logits.float().cpu()
    return p


def kv_entries(memory) -> int:
    """KV entries (token × KV head × layer) a memory holds, counted from what attach returned.
    A method whose memory is not a plain cache exposes `kv_entries()` itself."""
    if hasattr(memory, "kv_entries"):
        return int(memory.kv_entries())
    if isinstance(memory, KVMemory):
        return sum(int(lay.keys.shape[1] * lay.keys.shape[2]) for lay in memory.cache.layers if lay.keys is not None)
    raise TypeError(f"cannot count the entries of a {type(memory).__name__} memory")


def run_case(loaded, prepared: Prepared, method_name: str, fraction: float, with_citation: bool,
             chunk_tokens: int = CHUNK_TOKENS) -> dict:
    """One (method, budget, case) cell: build the memory, measure it, score the task."""
    case = prepared.case
    L, H, _ = loaded.kv_shape
    full_entries = L * H * len(prepared.memory_ids)
    row = {"method": method_name, "budget": fraction, "case": case.id, "task": case.task, "meta": case.meta}
    t0 = time.perf_counter()
    from .grid import parse_method

    name, params = parse_method(method_name)
    method = get_method(name, params, Budget(fraction=fraction))
    with tempfile.TemporaryDirectory(prefix="combllama-evals-") as tmp:
        store = MemoryStore(Path(tmp))
        try:
            result = ingest(loaded, prepared.document, method, store, name="case", config=config(chunk_tokens))
        except CombllamaError as e:  # e.g. full asked for a budget < 1, or a text beyond the window
            return {**row, "status": "n/a", "reason": str(e)}
        reader = store.open(result.name)
        memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
        stored = kv_entries(memory)
        row.update(status="ok", kv_entries=stored, full_kv_entries=full_entries,
                   memory_fraction=stored / full_entries, tensor_bytes=reader.stats()["tensor_bytes"],
                   encode_s=round(result.seconds, 3))
        if case.task == "fidelity":
            cont = prepared.continuation_ids
            from ..core.methods.base import prefill

            logits = prefill(loaded.model, cont[:-1], memory.cache, memory.logical_length, memory.lengths[0],
                             all_logits=True).float().cpu()
            row["fidelity"] = (token_stats(prepared.ref_logits, logits, cont[1:]) if prepared.ref_logits is not None
                               else nll_stats(logits, cont[1:]))
        else:
            engine = Engine(loaded.model, memory, loaded.eos_ids)
            answer_ids = list(engine.generate(prepared.question_ids, GenerateOptions(max_new_tokens=case.max_new_tokens)))
            row["answer_ids"] = answer_ids
            row["answer"] = loaded.tokenizer.decode(answer_ids, skip_special_tokens=True)
            if with_citation and case.task == "retrieval":
                row["citation"] = citation.first_source(loaded, memory, reader.manifest, prepared, answer_ids)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row
