"""CPU path: decode tokens/s of the embedded SmolLM2 through Engine (its default CPU path and the static
path without graphs) next to plain transformers' generate(), same prompt, same cores, same run.

    nice python -m combllama.bench.cpu_decode --out bench/results/cpu-decode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/cpu-decode")
    ap.add_argument("--memory-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from combllama.core.engine import Engine, GenerateOptions
    from combllama.core.methods.base import KVMemory, make_cache, prefill
    from combllama.core.model import ModelSpec, load_model
    from combllama.core.prompt import memory_prefix_ids, turn_ids

    loaded = load_model(ModelSpec(device="cpu"))
    text = Path(argparse.__file__).read_text()
    doc = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    mem_ids = (memory_prefix_ids(loaded.tokenizer) + doc)[:args.memory_tokens]
    q = turn_ids(loaded.tokenizer, "What does the ArgumentParser class do?")
    N = args.new_tokens

    cache = make_cache([])
    prefill(loaded.model, mem_ids, cache, 0)  # the `full` memory of these tokens (what attach builds)
    memory = KVMemory(cache, len(mem_ids), [len(mem_ids)] * loaded.model.config.num_hidden_layers)
    results: dict = {}
    for label, fast in (("engine_default", None), ("engine_static_no_graph", True)):
        eng = Engine(loaded.model, memory, [], fast=fast)
        list(eng.generate(q, GenerateOptions(max_new_tokens=4)))  # warm-up
        rates = []
        for _ in range(args.repeats):
            list(eng.generate(q, GenerateOptions(max_new_tokens=N)))
            rates.append(eng.stats.to_dict()["decode_tok_s"])
        results[label] = {"decode_tok_s_runs": rates, "decode_tok_s": sorted(rates)[len(rates) // 2],
                          "path": eng.stats.extra.get("path")}

    x = torch.tensor([mem_ids + q])

    def gen(n):
        t = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    gen(2)
    rates = []
    for _ in range(args.repeats):  # decode rate: a run of N tokens minus a run of 1 (the shared prefill)
        one, many = gen(1), gen(N)
        rates.append(round((N - 1) / (many - one), 1))
    results["transformers_generate"] = {"decode_tok_s_runs": rates, "decode_tok_s": sorted(rates)[len(rates) // 2],
                                        "path": "model.generate, DynamicCache, greedy"}
    record = {"command": "python -m combllama.bench.cpu_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "model": loaded.name, "dtype": str(loaded.dtype),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
              "memory_tokens": len(mem_ids), "question_tokens": len(q), "new_tokens": N, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    md = [f"| decode, {loaded.name} {record['dtype']}, {len(mem_ids):,}-token memory, {N} new tokens, "
          f"{os.cpu_count()} cores (load avg {record['machine']['load_average'][0]:.1f}) | tok/s (median of "
          f"{args.repeats}) |", "|---|---|"]
    for k, v in results.items():
        md.append(f"| {k} ({v['path']}) | {v['decode_tok_s']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
