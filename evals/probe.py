"""`python -m combllama.evals.probe`: one retrieval case, several method variants, side by side.

For diagnosing a grid result (which option makes a method find the needle) without running the grid:

    python -m combllama.evals.probe --passkey 4096:0.9:4098 --budget 0.125 \
        --methods 'hcattention,hcattention[tau=1.0],hcattention[sub_dim=1]' --out evals/results/NAME

A passkey case is LENGTH:DEPTH:SEED as the full suite makes them (its case ids read passkey-LENGTH-dDEPTH-sSEED).
Writes results.json (every row) and results.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .grid import machine, score, split_methods

    parser = argparse.ArgumentParser(prog="python -m combllama.evals.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--passkey", action="append", required=True, metavar="LENGTH:DEPTH:SEED")
    parser.add_argument("--methods", required=True)
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from ..core.model import ModelSpec, load_model
    from .cases import passkey_case
    from .runner import prepare, run_case

    loaded = load_model(ModelSpec(device=args.device, dtype=args.dtype))
    rows = []
    for spec in args.passkey:
        n, depth, seed = spec.split(":")
        case = passkey_case(loaded.tokenizer, int(n), float(depth), seed=int(seed))
        prepared = prepare(loaded, case)
        for method in split_methods(args.methods):
            t0 = time.perf_counter()
            row = score(run_case(loaded, prepared, method, args.budget, False), case, loaded.tokenizer)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{case.id} {method}: score {row.get('score')} mem {row.get('memory_fraction', 0):.3f} "
                  f"{row.get('answer', row.get('reason', ''))[:40]!r}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m combllama.evals.probe " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
              "model": {"name": loaded.name, "fingerprint": loaded.fingerprint,
                        "dtype": str(loaded.dtype).removeprefix("torch.")}, "budget": args.budget, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# probe: {loaded.name} ({result['model']['dtype']}, {args.device}), budget {args.budget}", "",
             f"`{result['command']}` — {result['date']}, {result['machine']['cpu']}", "",
             "| case | method | memory (measured) | passkey found | answer |", "|---|---|---|---|---|"]
    for r in rows:
        ans = (r.get("answer") or r.get("reason") or "").replace("|", "/").replace("\n", " ")[:48]
        mem = f"{r['memory_fraction']:.3f}" if "memory_fraction" in r else "n/a"
        lines.append(f"| {r['case']} | {r['method']} | {mem} | {r.get('score')} | {ans} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
