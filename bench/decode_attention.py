"""Decode attention kernels on the GPU, alone: the per-step attention of a batch-1 decode over a memory of
M entries plus a turn, for every layer of a model's shape, captured in one CUDA graph per variant.

Variants: `split` (the memory through SDPA's flash kernel, the turn through a masked fp32 part, merged by
log-sum-exp: three pieces and ~25 small kernels a layer), `unified` (core/fast/attention.attend_prefix:
FlashAttention varlen over memory + turn up to a device-side length, one kernel), and `unified/sN` with a
forced split-KV factor N where PyTorch's op takes one. Prints a table and writes JSON:

    python -m combllama.bench.decode_attention --out $OUT/decode-attention --lengths 4096,16384,131072

Knows nothing of models beyond the shape numbers; random K/V (attention cost does not depend on values).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = {"llama-3.1-8b": dict(layers=32, q_heads=32, kv_heads=8, head_dim=128)}


def run(lengths: list[int], shape: dict, turn: int, splits: list[int], reps: int) -> dict:
    import torch

    from combllama.core.fast import attention

    dev, dt = torch.device("cuda"), torch.bfloat16
    L, Hq, Hkv, D = shape["layers"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    scale = D ** -0.5
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
           "flash_args": sorted(attention._flash_args()), "prefix_available": attention.prefix_available("cuda", dt),
           "shape": shape, "turn_slots": turn, "rows": []}
    for M in lengths:
        N = M + turn
        g = torch.Generator(device=dev).manual_seed(0)
        bufs = [(torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g),
                 torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g)) for _ in range(L)]
        q = torch.randn(1, Hq, 1, D, device=dev, dtype=dt, generator=g)
        used = torch.tensor(turn // 2, dtype=torch.long, device=dev)  # turn slots in use: half the buffer
        cu_q = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, N], dtype=torch.int32, device=dev)
        backend = attention.choose("cuda", dt)

        def split():
            o = None
            for k, v in bufs:
                om, lm = attention.attend(q, k[:, :, :M], v[:, :, :M], scale=scale, backend=backend)
                ot, lt = attention.masked_tail(q, k[:, :, M:], v[:, :, M:], used + 1, scale=scale)
                o, _ = attention.merge(om, lm, ot, lt)
            return o

        def unified(ns=None):
            def f():
                n = (used + (M + 1)).to(torch.int32).view(1)
                o = None
                for k, v in bufs:
                    o = attention.attend_prefix(q, k, v, n, cu_q, cu_k, scale=scale, num_splits=ns)
                return o
            return f

        variants = {"split": split}
        if out["prefix_available"]:
            variants["unified"] = unified()
            if "num_splits" in out["flash_args"]:
                variants.update({f"unified/s{s}": unified(s) for s in splits})
        ref = None
        for name, fn in variants.items():
            row = {"memory": M, "variant": name}
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        fn()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    res = fn()
                graph.replay()
                torch.cuda.synchronize()
                if ref is None:
                    ref = res.float().clone()
                row["rel_err_vs_split"] = float((res.float() - ref).norm() / ref.norm())
                t = time.perf_counter()
                for _ in range(reps):
                    graph.replay()
                torch.cuda.synchronize()
                step = (time.perf_counter() - t) / reps
                kv_bytes = L * 2 * Hkv * (M + int(used) + 1) * D * 2
                row.update(us_per_layer=round(step / L * 1e6, 2), ms_per_step=round(step * 1e3, 3),
                           kv_gb_s=round(kv_bytes / step / 1e9, 1))
                del graph
            except Exception as e:  # a variant this build cannot run is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        del bufs
        torch.cuda.empty_cache()
    return out


def markdown(rec: dict) -> str:
    lines = [f"## Decode attention kernels — {rec['device']}, torch {rec['torch']}",
             "", f"Shape {rec['shape']}, bf16, batch 1, {rec['turn_slots']} turn slots (half in use), all layers "
             f"in one CUDA graph. FlashAttention op arguments: {', '.join(rec['flash_args'])}.", "",
             "| memory entries | variant | µs/layer | ms/step (all layers) | KV GB/s | rel. err vs split |",
             "|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if "error" in r:
            lines.append(f"| {r['memory']:,} | {r['variant']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['memory']:,} | {r['variant']} | {r['us_per_layer']} | {r['ms_per_step']} | "
                         f"{r['kv_gb_s']} | {r['rel_err_vs_split']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for decode-attention.json/.md")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="4096,16384,131072")
    ap.add_argument("--turn", type=int, default=256, help="turn slots after the memory")
    ap.add_argument("--splits", default="1,4,8,16,32", help="forced split-KV factors to try")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args(argv)
    rec = run([int(x) for x in a.lengths.split(",")], SHAPES[a.shape], a.turn,
              [int(x) for x in a.splits.split(",") if x], a.reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode-attention.json").write_text(json.dumps(rec, indent=2))
    md = markdown(rec)
    (out / "decode-attention.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
