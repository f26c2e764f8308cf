"""Where a decode step's time goes on the GPU: core/fast's step on Llama-3.1-8B shapes (RANDOM weights)
over a static memory of M entries, measured three ways —

- `graph`: captured steps replayed back to back (the GPU's own time per step, no host in between);
- `engine loop`: step + argmax + .item() per token, as Engine streams (adds the host's turn-around);
- `kernels`: one eager step under torch.profiler, CUDA time summed by kind (matmuls, attention, the rest)
  and the number of launches, next to the bandwidth floor (weights + KV read once at 3.0 TB/s).

    python -m combllama.bench.profile_decode --out $OUT/profile-decode --lengths 16384,131072

Writes profile-decode.json/.md. Memory contents are random (cost does not depend on values).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

COPY_BW = 3.0e12  # device memory copy measured on the H100 (../shared/GPU.md)


def kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "gemv", "cutlass", "xmma", "sm90", "cublas", "splitk")):
        return "matmul"
    return "other (norms, rope, casts, adds, copies)"


def profile(lengths: list[int], steps: int) -> dict:
    import torch

    from combllama.bench.gpu_speed import build_shapes_model, shapes_config
    from combllama.core.engine import GREEDY_BURST
    from combllama.core.fast.decode import FastDecoder
    from combllama.core.fast.static_cache import StaticKV

    dev, dt = torch.device("cuda"), torch.bfloat16
    config = shapes_config(False, max(lengths), None)
    model = build_shapes_model(torch, config, dev, dt)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    L, Hkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weights_bytes": weights, "rows": []}
    for M in lengths:
        st = StaticKV.allocate(L, Hkv, D, M, 256, device=dev, dtype=dt)
        for b in (*st.k, *st.v):
            b[:, :, :M].normal_()
        for unified in (True, False):
            row = {"memory": M, "decode": "unified" if unified else "split"}
            dec = FastDecoder(model, st, unified=unified)
            st.reset()
            dec.prefill(list(range(100, 116)), M)
            tok, pos = 5, M + 16
            for _ in range(3):  # capture + warm
                dec.step(tok, pos)
                pos += 1
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                dec._graph.replay()
            torch.cuda.synchronize()
            row["graph_ms"] = round((time.perf_counter() - t) / steps * 1e3, 3)
            t = time.perf_counter()
            for _ in range(steps):
                tok = int(dec.step(tok, pos).argmax())
                pos += 1
            row["engine_loop_ms"] = round((time.perf_counter() - t) / steps * 1e3, 3)
            # what Engine runs for greedy answers: GREEDY_BURST steps per replay, one host sync per burst
            st.reset()
            dec.prefill(list(range(100, 116)), M)
            tok, pos = 5, M + 16
            dec.greedy_steps(tok, pos, GREEDY_BURST)  # capture + warm
            pos += GREEDY_BURST
            torch.cuda.synchronize()
            t, n = time.perf_counter(), 0
            while n < steps:
                tok = dec.greedy_steps(tok, pos, GREEDY_BURST)[-1]
                pos, n = pos + GREEDY_BURST, n + GREEDY_BURST
            row["burst_loop_ms"] = round((time.perf_counter() - t) / n * 1e3, 3)
            dec.use_graph = False
            dec.step(tok, pos)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                dec.step(tok, pos + 1)
                torch.cuda.synchronize()
            by, launches = defaultdict(float), defaultdict(int)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    k = kind(e.name)
                    by[k] += e.device_time_total / 1e3
                    launches[k] += 1
            row["kernels_ms"] = {k: round(v, 3) for k, v in sorted(by.items())}
            row["launches"] = dict(sorted(launches.items()))
            used = 16 + 3 + steps + 2
            kv = L * 2 * Hkv * (M + used) * D * 2
            row["floor_ms"] = round((weights + kv) / COPY_BW * 1e3, 3)
            row["tok_s_graph"] = round(1e3 / row["graph_ms"], 1)
            row["tok_s_engine_loop"] = round(1e3 / row["engine_loop_ms"], 1)
            row["tok_s_burst_loop"] = round(1e3 / row["burst_loop_ms"], 1)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            del dec
        del st
        torch.cuda.empty_cache()
    return out


def markdown(rec: dict) -> str:
    lines = [f"## Where a decode step goes — {rec['device']}, torch {rec['torch']}",
             "", "Llama-3.1-8B shapes, RANDOM weights, bf16, batch 1, core/fast static memory. `graph`: replays "
             "back to back; `engine loop`: step + argmax + .item() per token; `burst loop`: Engine's greedy path, "
             "GREEDY_BURST steps per replay and one transfer per burst; kernels: one eager step under "
             "torch.profiler (CUDA time by kind, launches); floor: weights + KV read once at 3.0 TB/s.", "",
             "| memory | decode | graph ms (tok/s) | engine loop ms (tok/s) | burst loop ms (tok/s) | floor ms | "
             "matmul ms | attention ms | other ms | launches |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        k = r["kernels_ms"]
        other = next((v for n, v in k.items() if n.startswith("other")), 0)
        lines.append(f"| {r['memory']:,} | {r['decode']} | {r['graph_ms']} ({r['tok_s_graph']}) | "
                     f"{r['engine_loop_ms']} ({r['tok_s_engine_loop']}) | {r.get('burst_loop_ms', '–')} "
                     f"({r.get('tok_s_burst_loop', '–')}) | {r['floor_ms']} | {k.get('matmul', 0)} | "
                     f"{k.get('attention', 0)} | {other} | {sum(r['launches'].values())} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="16384,131072")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    rec = profile([int(x) for x in a.lengths.split(",")], a.steps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-decode.json").write_text(json.dumps(rec, indent=2))
    md = markdown(rec)
    (out / "profile-decode.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
