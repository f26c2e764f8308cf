"""HCAttention on one GPU against plain transformers, with Llama-3.1-8B shapes and RANDOM weights.

    python bench/hcattention_gpu.py                 # H100: 1M-token memory; plain transformers at 128K and 256K
    python bench/hcattention_gpu.py --tiny          # CPU smoke run with tiny shapes (seconds)

Steps: (1) correctness: on a small random model, τ=1.0 reproduces exact attention (both read paths);
(2) plain transformers (SDPA, DynamicCache, one prefill forward then greedy decode) at --plain-sizes,
an out-of-memory recorded as such; (3) HCAttention ingests --tokens synthetic token ids chunk by chunk
(encoder → attach in process, no disk: a 1M-token memory file is larger than the machine's disk) and
decodes with each read path (gather to the GPU / weighted sum on the host), once plain for tokens/s and
once synchronised for the split of time (selection, transfer, attention); (4) the two read paths' cost
against the number of rows read, which sets read.GATHER_MAX_BYTES. Speed and memory do not depend on
weight values, but the share of tokens τ selects does: --q-scale sharpens the random attention (the
measured kept share is reported). Writes hcattention-gpu.json and .md under $OUT (default bench/results).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import combllama  # noqa: F401
except ImportError:  # a source checkout that is not installed: map its root folders into `combllama`
    import importlib.util
    import types

    pkg = types.ModuleType("combllama")
    pkg.__path__ = []
    sys.modules["combllama"] = pkg
    for sub in ("core", "ingest"):
        spec = importlib.util.spec_from_file_location(f"combllama.{sub}", ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"combllama.{sub}"] = mod
        spec.loader.exec_module(mod)

from combllama.core.engine import Engine, GenerateOptions  # noqa: E402
from combllama.core.methods import get_method  # noqa: E402
from combllama.core.methods.base import prefill  # noqa: E402
from combllama.core.methods.hcattention import accounting  # noqa: E402
from combllama.core.methods.hcattention import read as hc_read  # noqa: E402
from combllama.core.tokenize import Chunk  # noqa: E402

GiB = 2 ** 30
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def host_now_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GiB
    return 0.0


def gpu_reset(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def gpu_peak_gib(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None


def build_model(shape: dict, window: int, dev, dtype, q_scale: float, seed: int):
    """A random-weight Llama of `shape`, built directly on `dev` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, max_position_embeddings=window, rope_theta=500000.0, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:  # random weights attend almost uniformly; sharpen like a trained model
            layer.self_attn.q_proj.weight.mul_(q_scale)
    return model


def ingest(model, ids: list[int], params: dict, chunk_tokens: int):
    """encoder → attach in one pass (chunk tensors stream straight into the device codes and host rows)."""
    method = get_method("hcattention", params)
    c = model.config
    n = len(ids)
    enc = method.encoder(model, n)
    o = method.options
    g = c.head_dim // enc.sub_dim
    manifest = {"name": "bench", "tokens": {"count": n}, "positions": {"logical_length": n},
                "chunks": [{"tensors": {"codebooks": ["F32", [c.num_hidden_layers, c.num_key_value_heads, g,
                                                                enc.layout.centroids, enc.sub_dim]],
                                        "v": ["I8" if o.value_bits == 8 else "BF16", []]}}]}

    def blocks():
        for i, a in enumerate(range(0, n, chunk_tokens)):
            b = min(n, a + chunk_tokens)
            yield {"start": a, "end": b}, enc.encode(Chunk(i, a, b, tuple(ids[a:b])))

    return method.attach(model, manifest, blocks()), enc


def check_tau_one(dev, n: int, seed: int) -> dict:
    """τ = 1.0 equals exact attention: next-token logits after a question, small fp32 model on `dev`."""
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, vocab_size=1000)
    model = build_model(shape, n + 1024, dev, torch.float32, 1.0, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (n,), generator=g).tolist()
    q = torch.randint(0, 1000, (24,), generator=g).tolist()
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids + q], device=dev), logits_to_keep=1).logits[0, -1].float()
    out = {}
    for transfer in ("gather", "host"):
        mem, _ = ingest(model, ids, {"tau": 1.0, "transfer": transfer, "recent": 32, "calib_tokens": 512},
                        max(64, n // 4))
        got = prefill(model, q, mem.cache, mem.logical_length, 0).float()
        diff = float((got - ref).abs().max())
        out[transfer] = {"max_abs_diff": diff, "ok": bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3)),
                         "same_argmax": int(got.argmax()) == int(ref.argmax())}
    del model
    return out


def plain(model, n: int, new: int, dev, seed: int) -> dict:
    """Plain transformers: one prefill forward over n tokens (SDPA, DynamicCache), then greedy decode."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    gpu_reset(dev)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(dev)
    row = {"system": "transformers", "tokens": n}
    cache = None
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(dev)
            t1 = time.perf_counter()
            tok = out.logits[0, -1].argmax()
            for _ in range(new):
                out = model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True)
                tok = out.logits[0, -1].argmax()
            sync(dev)
            t2 = time.perf_counter()
        row.update(status="ok", prefill_s=round(t1 - t0, 2), decode_tok_s=round(new / (t2 - t1), 2))
    except torch.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        row.update(peak_gpu_gib=gpu_peak_gib(dev), peak_host_gib=round(host_peak_gib(), 2))
        del cache, ids
        gpu_reset(dev)
    return row


def decode_hc(model, mem, q: list[int], new: int, transfer: str, profile: bool, dev) -> dict:
    """Prefill the question, then decode `new` tokens. The read path's split is reported apart for the
    question's prefill (group × question rows per KV head: far more selection work than a step) and per
    decode step: the counters are read when the first token arrives and reset for the steps after it."""
    st = mem.store
    st.transfer, st.profile = transfer, profile
    eng = Engine(model, mem, eos_ids=[])
    st.reset_stats()
    gen = eng.generate(q, GenerateOptions(max_new_tokens=new))
    next(gen)  # the question's prefill and the first token
    prefill_times = dict(st.times)
    st.reset_stats()
    list(gen)
    s = eng.stats.to_dict()
    steps = max(1, new - 1)
    row = {"transfer": transfer, "prefill_s": s["prefill_s"], "decode_tok_s": s["decode_tok_s"],
           "kept_share": round(st.counts["selected"] / max(1, st.counts["selectable"]), 4),
           "paths": {"gather": st.counts["gather"], "host": st.counts["host"]}}
    if profile:
        row["split_ms_question_prefill"] = {k: round(1000 * v, 1) for k, v in prefill_times.items()}
        row["split_ms_per_step"] = {k: round(1000 * v / steps, 1) for k, v in st.times.items()}
    return row


def transfer_sweep(dev, H: int, D: int, G: int, n: int, counts: list[int], value_bits: int, reps: int) -> list:
    """Cost of reading k rows per KV head (exact keys + values) by each path, one layer, one query step."""
    from combllama.core.methods.hcattention.quant import quantize_rows
    from combllama.core.methods.hcattention.read import HostRows, Store, _gather_to_device, _host_partials

    pin = dev.type == "cuda"
    data = torch.randn(H, n, D, dtype=torch.bfloat16)
    if value_bits == 8:
        qd, sc = quantize_rows(data)
        rows = HostRows(qd.pin_memory() if pin else qd, sc.pin_memory() if pin else sc)
    else:
        rows = HostRows(data.pin_memory() if pin else data)
    del data
    store = Store([], 0.9, "gather", True, torch.bfloat16)
    lay = type("L", (), {"host_k": rows, "host_v": rows})()
    out = []
    g = torch.Generator().manual_seed(0)
    for k in counts:
        k = min(k, n)
        idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(H)])  # [H, k]
        flat = (idx + torch.arange(H)[:, None] * n).reshape(-1)
        valid = torch.ones(H, k, dtype=torch.bool)
        q = torch.randn(H, G, D)
        times = {}
        for mode in ("gather", "host"):
            best = float("inf")
            for _ in range(reps):
                sync(dev)
                t0 = time.perf_counter()
                if mode == "gather":
                    _gather_to_device(store, rows, flat, dev, torch.float32, "k")
                    _gather_to_device(store, rows, flat, dev, torch.float32, "v")
                else:
                    part = _host_partials(lay, q, None, flat, valid, D ** -0.5)
                    [x.to(dev) for x in part]
                sync(dev)
                best = min(best, time.perf_counter() - t0)
            times[mode] = round(1000 * best, 3)
        bytes_read = flat.numel() * rows.data.shape[-1] * rows.data.element_size() * 2
        out.append({"rows_per_head": k, "bytes": bytes_read, "gather_ms": times["gather"], "host_ms": times["host"],
                    "faster": min(times, key=times.get)})
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# HCAttention vs plain transformers — {res['shape_name']} (RANDOM weights)", "",
             f"Device: {res['device']}; torch {res['torch']}, transformers {res['transformers']}; "
             f"q_proj ×{a['q_scale']} (sharpened random attention); τ={a['tau']}, value_bits={a['value_bits']}, "
             f"exact_keys={a['exact_keys']}. Command: `{res['command']}`", "",
             f"Correctness (τ=1.0 vs exact, small fp32 model): "
             + ", ".join(f"{k}: max |Δlogit| {v['max_abs_diff']:.2e} ({'ok' if v['ok'] else 'FAIL'})"
                         for k, v in res["check"].items()), "",
             "| system | tokens | status | prefill/ingest s | decode tok/s | kept share | split ms per decode step "
             "(sel/xfer/attn) | split ms, question prefill | peak GPU GiB | peak host GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        sp = r.get("split_ms_per_step")
        split = f"{sp['selection']}/{sp['transfer']}/{sp['attention']}" if sp else ""
        pp = r.get("split_ms_question_prefill")
        split += " | " + (f"{pp['selection']}/{pp['transfer']}/{pp['attention']}" if pp else "")
        gpu = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "-"
        lines.append(f"| {r['system']} | {r['tokens']:,} | {r['status']} | {r.get('prefill_s', r.get('ingest_s', ''))} "
                     f"| {r.get('decode_tok_s', '')} | {r.get('kept_share', '')} | {split} | {gpu} "
                     f"| {r.get('peak_host_gib', '')} |")
    acc = res.get("accounting")
    if acc:
        lines += ["", f"Device-resident HCAttention memory: {acc['device'] / GiB:.2f} GiB = "
                      f"{100 * acc['device_share']:.2f}% of the full bf16 KV cache ({acc['full_bf16'] / GiB:.1f} GiB): "
                      f"codes {acc['codes'] / GiB:.2f}, codebooks {acc['codebooks'] / GiB:.3f}, exact sinks+recent "
                      f"{acc['exact'] / GiB:.3f}, outliers {acc.get('outliers', 0) / GiB:.2f} GiB (sub_dim "
                      f"{acc['sub_dim']}, {acc['centroids']} centroids, recent {acc.get('recent', '?')}); host rows "
                      f"{acc['host'] / GiB:.1f} GiB."]
    if res.get("sweep"):
        lines += ["", "Read paths, one layer, one step (rows read per KV head → ms):", "",
                  "| rows/head | MiB read | gather ms | host ms | faster |", "|---|---|---|---|---|"]
        lines += [f"| {s['rows_per_head']:,} | {s['bytes'] / 2**20:.1f} | {s['gather_ms']} | {s['host_ms']} | {s['faster']} |"
                  for s in res["sweep"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test of this script)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="HCAttention memory size")
    p.add_argument("--plain-sizes", default="131072,262144", help="plain transformers context sizes")
    p.add_argument("--new-tokens", type=int, default=8, help="decoded tokens per measurement")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--value-bits", type=int, default=8, choices=(8, 16),
                   help="host rows (1M tokens: 8-bit fits 128 GiB of host memory with exact keys)")
    p.add_argument("--no-exact-keys", dest="exact_keys", action="store_false")
    p.add_argument("--q-scale", type=float, default=2.0)
    p.add_argument("--transfers", default="gather,host")
    p.add_argument("--sweep", default="1024,8192,65536,262144", help="rows per KV head for the read-path sweep")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (scale down)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.tiny:
        shape, dtype, name = dict(TINY), torch.float32, "tiny Llama"
        if a.tokens == 1_000_000:
            a.tokens, a.plain_sizes, a.chunk_tokens, a.new_tokens, a.sweep = 4096, "1024,2048", 512, 4, "64,512"
    else:
        shape, dtype, name = dict(LLAMA_8B), torch.bfloat16, "Llama-3.1-8B shapes"
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    import transformers

    res = {"shape_name": name, "shape": shape, "random_weights": True, "args": vars(a),
           "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                            and ROOT in Path(sys.argv[0]).parents else sys.argv[0]] + sys.argv[1:]),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
           "torch": torch.__version__, "transformers": transformers.__version__, "rows": []}

    log("correctness: τ=1.0 against exact attention")
    res["check"] = check_tau_one(dev, 1024 if not a.tiny else 256, a.seed)
    if not all(v["ok"] for v in res["check"].values()):
        log(f"correctness check FAILED: {res['check']}")
    gpu_reset(dev)

    window = max(a.tokens, *(int(s) for s in a.plain_sizes.split(","))) + 8192
    log(f"building {name} with random weights ({shape['num_hidden_layers']} layers)")
    model = build_model(shape, window, dev, dtype, a.q_scale, a.seed)
    res["model_gib"] = round(sum(t.numel() * t.element_size() for t in model.parameters()) / GiB, 2)

    for n in (int(s) for s in a.plain_sizes.split(",") if s):
        log(f"plain transformers at {n:,} tokens")
        res["rows"].append(plain(model, n, a.new_tokens, dev, a.seed))
        log(f"  {res['rows'][-1]}")

    log(f"HCAttention: ingesting {a.tokens:,} tokens")
    gpu_reset(dev)
    ids = torch.randint(0, shape["vocab_size"], (a.tokens,), generator=torch.Generator().manual_seed(a.seed)).tolist()
    q = torch.randint(0, shape["vocab_size"], (a.question_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    params = {"tau": a.tau, "value_bits": a.value_bits, "exact_keys": a.exact_keys}
    t0 = time.perf_counter()
    mem, enc = ingest(model, ids, params, a.chunk_tokens)
    sync(dev)
    ingest_s = time.perf_counter() - t0
    del ids
    res["accounting"] = mem.accounts
    res["prefill_mode"] = enc.mode
    res["ingest"] = {"seconds": round(ingest_s, 1), "tokens_per_s": round(a.tokens / ingest_s, 1),
                     "peak_gpu_gib": gpu_peak_gib(dev), "host_rss_gib": round(host_now_gib(), 2)}
    log(f"  ingest {res['ingest']}")
    acc = accounting(a.tokens, shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"],
                     enc.sub_dim, enc.layout.centroids, 4, enc.layout.recent, a.exact_keys, a.value_bits,
                     enc.o.outliers)
    res["accounting_formula"] = acc
    for transfer in a.transfers.split(","):
        gpu_reset(dev)
        plain_row = decode_hc(model, mem, q, a.new_tokens, transfer, False, dev)
        prof = decode_hc(model, mem, q, max(2, a.new_tokens // 2), transfer, True, dev)
        row = {"system": f"hcattention ({transfer})", "tokens": a.tokens, "status": "ok", "ingest_s": round(ingest_s, 1),
               **plain_row, "split_ms_per_step": prof["split_ms_per_step"],
               "split_ms_question_prefill": prof["split_ms_question_prefill"], "profiled_decode_tok_s": prof["decode_tok_s"],
               "peak_gpu_gib": gpu_peak_gib(dev), "peak_host_gib": round(host_peak_gib(), 2)}
        res["rows"].append(row)
        log(f"  {row}")
    del mem, enc
    gpu_reset(dev)

    if a.sweep:
        log("read paths: gather vs host by rows read")
        res["sweep"] = transfer_sweep(dev, shape["num_key_value_heads"], shape["head_dim"],
                                      shape["num_attention_heads"] // shape["num_key_value_heads"],
                                      max(int(s) for s in a.sweep.split(",")) * 2,
                                      [int(s) for s in a.sweep.split(",")], a.value_bits, 3)
        faster_gather = [s["bytes"] for s in res["sweep"] if s["faster"] == "gather"]
        res["gather_max_bytes_measured"] = max(faster_gather) if faster_gather else 0
        res["gather_max_bytes_in_code"] = hc_read.GATHER_MAX_BYTES
    res["wall_s"] = round(time.perf_counter() - t_start, 1)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "hcattention-cpu-tiny" if a.tiny else "hcattention-gpu"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    log(f"wrote {out / stem}.json and .md in {res['wall_s']} s")
    print(md)
    return 0 if all(v["ok"] for v in res["check"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
