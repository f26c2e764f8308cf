"""Per-method speed on the embedded model: ingest tokens/s, bytes per token on disk, time to first
answer token from the persisted memory, and decode tokens/s — every registered method, same document,
same machine, same run (issue 8 asks CombLlama against full and KVCompose, CPU and GPU).

    python -m combllama.bench.methods_speed --methods full,kvcompose:0.25,combllama,hcattention:0.125 \
        --out bench/results/methods-speed-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def document(chars: int) -> str:
    """Real text every Python installation has: the standard library's own argparse source."""
    import argparse as _a

    return Path(_a.__file__).read_text()[:chars]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="full,truncate:0.25,kvcompose:0.25,combllama,hcattention:0.125")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--doc-chars", type=int, default=20000)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results") + "/methods-speed")
    args = ap.parse_args(argv)

    import torch

    from combllama import ingest as sources
    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.engine import Engine, GenerateOptions
    from combllama.core.memory.store import MemoryStore
    from combllama.core.fast.load import attach_reader
    from combllama.core.methods import Budget, get_method
    from combllama.core.model import ModelSpec, load_model
    from combllama.core.prompt import turn_ids

    loaded = load_model(ModelSpec(device=args.device))
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="combllama-methods-"))
    path = tmp / "argparse_excerpt.txt"
    path.write_text(document(args.doc_chars))
    doc = sources.load(path)
    store = MemoryStore(tmp / "memories")
    q = turn_ids(loaded.tokenizer, "What does the ArgumentParser class do?")
    rows = []
    for spec in args.methods.split(","):
        name, _, frac = spec.partition(":")
        row = {"method": spec}
        try:
            method = get_method(name, None, Budget(fraction=float(frac)) if frac else None)
            sync()
            t = time.perf_counter()
            res = ingest(loaded, doc, method, store, name=spec.replace(":", "-"),
                         config=EncodeConfig(chunk_tokens=args.chunk_tokens))
            sync()
            ingest_s = time.perf_counter() - t
            stats = res.stats
            ttfts = []
            for _ in range(3):
                t = time.perf_counter()
                memory = attach_reader(store.open(res.name), loaded)  # as ask and chat attach
                engine = Engine(loaded.model, memory, loaded.eos_ids)
                gen = engine.generate(q, GenerateOptions(max_new_tokens=args.decode_tokens))
                next(gen, None)
                sync()
                ttfts.append(time.perf_counter() - t)
                t = time.perf_counter()
                n = 1 + sum(1 for _ in gen)
                sync()
                decode_s = time.perf_counter() - t
            row.update(memory_tokens=stats["tokens"], ingest_s=round(ingest_s, 3),
                       ingest_tok_s=round(stats["tokens"] / ingest_s, 1), bytes=stats["bytes"],
                       bytes_per_token=stats["bytes_per_token"], ttft_s=round(sorted(ttfts)[1], 4),
                       decode_tok_s=round((n - 1) / decode_s, 1) if n > 1 and decode_s else None)
        except Exception as e:  # a method that cannot serve this case is reported, not hidden
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "dtype": str(loaded.dtype), "model": loaded.name, "fingerprint": loaded.fingerprint,
              "torch": torch.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "document_tokens": rows[0].get("memory_tokens"), "args": vars(args), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"Per-method speed, {loaded.name} {record['dtype']} on {record['device']} ({record['date']})", "",
             "| method | memory tokens | ingest tok/s | bytes/token on disk | TTFT from memory s | decode tok/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['memory_tokens']:,} | {r['ingest_tok_s']:,.0f} | "
                         f"{r['bytes_per_token']:,.0f} | {r['ttft_s']:.3f} | {r['decode_tok_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
