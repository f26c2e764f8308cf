"""HCAttention's per-step token selection alone, on the GPU: the product-quantized scores it starts from
(`approx_logits`), `select` (log-probability bins, one pass, no sort) against `select_exact` (a full sort
per row), and the compaction into padded indices, for one layer's rows (kv_heads × group) over n
selectable tokens; a decode step runs this once per layer.

    python -m combllama.bench.hc_select --out $OUT/hc-select --tokens 131072,1048576

Synthetic logits: `flat` (what a random-weight model gives: τ needs most tokens) and `peaked` (a few
hundred tokens hold most of the mass, as in trained models). Writes hc-select.json/.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(tokens: list[int], heads: int, group: int, layers: int, tau: float, reps: int) -> dict:
    import torch

    from combllama.core.methods.hcattention.quant import approx_logits
    from combllama.core.methods.hcattention.read import _padded_indices, select, select_exact

    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": heads, "group": group,
           "layers": layers, "tau": tau, "rows": []}

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            r = fn()
        torch.cuda.synchronize()
        return r, (time.perf_counter() - t) / reps

    for n in tokens:
        g = torch.Generator(device=dev).manual_seed(0)
        # the scores selection starts from: product-quantized keys (sub_dim 4 → 32 subspaces, 256 centroids)
        D, sub, cents = 128, 4, 256
        books = torch.randn(heads, D // sub, cents, sub, device=dev, generator=g)
        codes = torch.randint(0, cents, (heads, n, D // sub), device=dev, generator=g, dtype=torch.int32).to(torch.uint8)
        q = torch.randn(heads, group, D, device=dev, generator=g)
        _, t_scores = timed(lambda: approx_logits(q, books, codes))
        del books, codes
        for shape in ("flat", "peaked"):
            z = torch.randn(heads, group, n, device=dev, generator=g) * (0.5 if shape == "flat" else 1.0)
            if shape == "peaked":
                spikes = torch.randint(0, n, (heads, group, 300), device=dev, generator=g)
                z.scatter_(-1, spikes, 12.0 + torch.randn(heads, group, 300, device=dev, generator=g))
            resident = torch.full((heads, group), -torch.inf, device=dev)
            fast, t_fast = timed(lambda: select(z, resident, tau))
            exact, t_exact = timed(lambda: select_exact(z, resident, tau))
            _, t_pad = timed(lambda: _padded_indices(fast))
            row = {"tokens": n, "logits": shape, "approx_logits_ms": round(t_scores * 1e3, 3),
                   "select_ms": round(t_fast * 1e3, 3),
                   "select_exact_ms": round(t_exact * 1e3, 3), "padded_indices_ms": round(t_pad * 1e3, 3),
                   "selected_share": round(float(fast.float().mean()), 4),
                   "exact_share": round(float(exact.float().mean()), 4),
                   "superset": bool((fast | ~exact).all()),
                   "per_step_ms": round((t_scores + t_fast + t_pad) * layers * 1e3, 1),
                   "per_step_exact_ms": round((t_scores + t_exact + t_pad) * layers * 1e3, 1)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def markdown(rec: dict) -> str:
    lines = [f"## HCAttention selection — {rec['device']}, torch {rec['torch']}", "",
             f"One layer's rows: {rec['heads']} KV heads × {rec['group']} query heads per group, τ = {rec['tau']}; "
             f"per step = × {rec['layers']} layers.", "",
             "| tokens | logits | PQ scores ms | select ms | exact (sort) ms | padded indices ms | "
             "selected / exact share | superset | per step ms: scores + select + indices (with exact) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['tokens']:,} | {r['logits']} | {r['approx_logits_ms']} | {r['select_ms']} | "
                     f"{r['select_exact_ms']} | "
                     f"{r['padded_indices_ms']} | {r['selected_share']} / {r['exact_share']} | {r['superset']} | "
                     f"{r['per_step_ms']} ({r['per_step_exact_ms']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="131072,1048576")
    ap.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head (Llama-3.1-8B: 4)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    rec = run([int(x) for x in a.tokens.split(",")], a.heads, a.group, a.layers, a.tau, a.reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hc-select.json").write_text(json.dumps(rec, indent=2))
    md = markdown(rec)
    (out / "hc-select.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
