"""`python -m combllama.evals run ...`: run a grid and write results.json, results.md and results.png.

    python -m combllama.evals run --methods full,truncate,kvpress:snapkv --budgets 1,0.5,0.25,0.125 \
        --tasks fidelity,retrieval,qa,citation --suite full --out evals/results/smollm2-cpu
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..core.errors import CombllamaError
from .cases import CHUNK_TOKENS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m combllama.evals", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a grid of methods × budgets × tasks")
    run.add_argument("--methods", default="full,truncate",
                     help="registered combllama methods and peers (kvpress:snapkv, kvpress:streaming_llm, "
                          "kvpress:expected_attention, kvpress:kvcompose, ...)")
    run.add_argument("--budgets", default="1,0.5,0.25,0.125", help="memory fractions")
    run.add_argument("--tasks", default="fidelity,retrieval,qa,citation")
    run.add_argument("--suite", default="smoke", choices=["smoke", "full"],
                     help="smoke: tiny generated inputs (CI); full: RULER wheel data (make evals-data)")
    run.add_argument("--model", default=None, metavar="PATH", help="local HF model dir (default: embedded SmolLM2)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    run.add_argument("--limit", type=int, default=None, help="at most N cases per task")
    run.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="ingest chunk size of combllama methods")
    run.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                     help="full-suite size override, repeatable (e.g. passkey_lengths=1024,4096 long_texts=1)")
    run.add_argument("--out", required=True, help="results folder, e.g. evals/results/NAME")
    mrg = sub.add_parser("merge", help="join results.json files of grids run in pieces (same model and cases)")
    mrg.add_argument("inputs", nargs="+", metavar="RESULTS_JSON")
    mrg.add_argument("--out", required=True, help="results folder for the joined table and plot")
    args = parser.parse_args(argv)
    # A time limit's SIGTERM unwinds like Ctrl-C, so a peer subprocess is stopped with the harness.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from .cases import FullSuite, parse_sizes
    from .grid import GridConfig, merge, run_grid, split_methods
    from .report import write

    if args.command == "merge":
        import json
        from pathlib import Path

        try:
            result = merge([json.loads(Path(p).read_text()) for p in args.inputs])
        except (CombllamaError, OSError, ValueError, KeyError) as e:
            print(f"error: cannot merge: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 3)
        paths = write(result, args.out)
        sys.stdout.write(paths["md"].read_text())
        return 0

    def log(msg: str) -> None:
        print(f"evals: {msg}", file=sys.stderr, flush=True)

    try:
        cfg = GridConfig(methods=split_methods(args.methods), budgets=tuple(float(b) for b in _csv(args.budgets)),
                         tasks=_csv(args.tasks), suite=args.suite, model=args.model, device=args.device, dtype=args.dtype,
                         limit=args.limit, chunk_tokens=args.chunk_tokens, full_suite=parse_sizes(args.size, FullSuite()))
        result = run_grid(cfg, log)
    except CombllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    paths = write(result, args.out)
    sys.stdout.write(paths["md"].read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
