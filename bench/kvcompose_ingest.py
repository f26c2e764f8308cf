"""Ingest speed and peak device memory of `kvcompose` against `full`, chunk by chunk through each
method's encoder (the part of ingest that runs on the device; no disk, no tokenizer).

    python -m combllama.bench.kvcompose_ingest --shape llama-3.1-8b --tokens 8192,32768 --out bench/results/kvcompose-ingest

Random weights (speed and memory do not depend on weight values): label results as random-weight shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152),
}


def build(shape: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def run(model, method_name: str, budget, tokens: int, chunk: int) -> dict:
    import torch

    from ..core.methods import get_method
    from ..core.tokenize import Chunk

    dev = model.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=gen).tolist()
    if method_name == "full":  # plain transformers SDPA, as a user gets it (kvcompose switches the model)
        model.set_attn_implementation("sdpa")
    enc = get_method(method_name, None, budget).encoder(model, tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    stored = 0
    for i, s in enumerate(range(0, tokens, chunk)):
        t = enc.encode(Chunk(i, s, min(tokens, s + chunk), tuple(ids[s:s + chunk])))
        stored += sum(x.numel() * x.element_size() for x in t.values())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else None
    return {"method": method_name, "budget": budget.to_json() if budget else None, "tokens": tokens,
            "chunk": chunk, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1),
            "peak_gib_over_weights": round(peak / 2**30, 3) if peak is not None else None,
            "stored_bytes": stored}


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..core.methods import Budget

    ap = argparse.ArgumentParser(prog="python -m combllama.bench.kvcompose_ingest", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build(args.shape, args.device, dtype)
    rows = []
    run(model, "kvcompose", Budget(fraction=0.25), 1024, args.chunk)  # warm-up (kernels, allocator)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, budget in (("full", None), ("kvcompose", Budget(fraction=0.25)), ("kvcompose", Budget(fraction=0.125))):
            rows.append(run(model, name, budget, tokens, args.chunk))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"command": "python -m combllama.bench.kvcompose_ingest " + " ".join(argv or sys.argv[1:]),
            "shape": args.shape + " (random weights)", "dtype": str(dtype), "device": device,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# ingest: kvcompose vs full, {meta['shape']}, {dtype}, {device}", "", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; torch {meta['torch']}", "",
             "| tokens | method | budget | tok/s | peak GiB over weights | stored MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['method']} | {json.dumps(r['budget'])} | {r['tok_s']:,.0f} | "
                     f"{r['peak_gib_over_weights']} | {r['stored_bytes'] / 2**20:,.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
