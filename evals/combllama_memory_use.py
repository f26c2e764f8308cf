"""Does the shipped CombLlama adapter read its memory? A diagnostic for issue 8's quality gap.

For each fidelity text (PG essays, 1,024-token memory, 256 teacher-forced tokens, the grid's framing), the
continuation is scored against full context with four memories: the text's own CombLlama memory, the memory
of *another* text, no document at all (the prompt prefix only: the base model without the text), and
`truncate` at the memory CombLlama takes. If the own memory scores like another text's, the adapter's gain
over "no document" is a generic bias learned by the gates, not information read from the memory.

    python -m combllama.evals.combllama_memory_use --out evals/results/combllama-memory-use [--texts 4]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .report import save


def score(loaded, memory, prepared) -> dict:
    from ..core.methods.base import prefill, trim_cache
    from .metrics import token_stats

    cont = prepared.continuation_ids
    logits = prefill(loaded.model, cont[:-1], memory.cache, memory.logical_length, memory.lengths[0],
                     all_logits=True).float().cpu()
    trim_cache(memory.cache, memory.lengths)
    return token_stats(prepared.ref_logits, logits, cont[1:])


def run(args) -> dict:
    from ..core.chat import bare_memory
    from ..core.encode import ingest
    from ..core.fast.load import attach_reader
    from ..core.memory.store import MemoryStore
    from ..core.methods import Budget, get_method
    from ..core.model import ModelSpec, load_model
    from .cases import fidelity_case, pg_segments
    from .runner import config, prepare

    loaded = load_model(ModelSpec(args.model, device=args.device, dtype=args.dtype))
    texts = pg_segments(args.texts, 12000, seed=0)
    cases = [fidelity_case(loaded.tokenizer, f"pg-{i}", t, args.doc_tokens, "pg_essays") for i, t in enumerate(texts)]
    prepared = [prepare(loaded, c) for c in cases]
    rows: dict[str, list[dict]] = {k: [] for k in ("own", "other", "none", "truncate")}
    with tempfile.TemporaryDirectory(prefix="combllama-use-") as tmp:
        store = MemoryStore(Path(tmp))
        comb, trunc = [], []
        # The cross memory alone, whole: no recent tail, no pruning (what the diagnostic asks about).
        comb_method = get_method("combllama", {"adapter": args.adapter, "recent": 0}, Budget(fraction=1.0))
        for i, p in enumerate(prepared):
            ingest(loaded, p.document, comb_method, store, name=f"c{i}", config=config())
            comb.append(attach_reader(store.open(f"c{i}"), loaded))
            ingest(loaded, p.document, get_method("truncate", None, Budget(fraction=args.truncate)), store,
                   name=f"t{i}", config=config())
            trunc.append(attach_reader(store.open(f"t{i}"), loaded))
        bare = bare_memory(loaded)
        for i, p in enumerate(prepared):
            rows["own"].append(score(loaded, comb[i], p))
            rows["other"].append(score(loaded, comb[(i + 1) % len(prepared)], p))
            rows["none"].append(score(loaded, bare, p))
            rows["truncate"].append(score(loaded, trunc[i], p))
    summary = {}
    for k, rs in rows.items():
        n = sum(r["n"] for r in rs)
        summary[k] = {"kl": round(sum(r["kl_sum"] for r in rs) / n, 4), "top1": round(sum(r["top1"] for r in rs) / n, 3),
                      "tokens": n}
    return {"model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype), "args": vars(args),
            "summary": summary, "rows": rows}


def markdown(r: dict) -> str:
    s = r["summary"]
    label = {"own": "the text's own CombLlama memory", "other": "another text's CombLlama memory",
             "none": "no document (prompt prefix only)",
             "truncate": f"truncate at {r['args']['truncate']} (last tokens kept)"}
    adapter = r["args"].get("adapter", "auto")
    which = "the shipped CombLlama adapter" if adapter == "auto" else f"the CombLlama adapter `{adapter}`"
    lines = [f"# Does {which} read its memory? ({r['model']}, {r['device']}, {r['dtype']})", "",
             f"{r['args']['texts']} PG-essay texts, {r['args']['doc_tokens']}-token memory, "
             f"{s['own']['tokens']} teacher-forced tokens in all; KL and top-1 against full context.", "",
             "| memory | KL | top-1 |", "|---|---|---|"]
    lines += [f"| {label[k]} | {v['kl']:.4f} | {v['top1']:.3f} |" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m combllama.evals.combllama_memory_use",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--truncate", type=float, default=0.25)
    ap.add_argument("--adapter", default="auto", help="combllama's adapter option (default: the shipped one)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    result = run(args)
    save(result, markdown(result), args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
