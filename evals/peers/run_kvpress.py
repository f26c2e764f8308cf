"""Runs NVIDIA kvpress presses on the harness's inputs; executed by .venv-kvpress's python, never imported.

kvpress 0.5.5 pins transformers<5.3, so it lives in its own virtualenv (setup_kvpress.sh) and
talks to the harness through JSON: token ids and the model directory in, per (case, press, ratio)
KV entries kept, fidelity sums and greedy answer ids out. It mirrors kvpress's own pipeline:
prefill the context under `with press(model)`, then continue at position = context length.
Usage: python run_kvpress.py INPUT.json OUTPUT.json
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path


def _metrics():
    """evals/metrics.py loaded by path: the same scoring code as the harness, without combllama."""
    spec = importlib.util.spec_from_file_location("evals_metrics", Path(__file__).resolve().parents[1] / "metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stand_in_attribute(unavailable):
    def getattr_(attr: str):
        if attr.startswith("__"):  # __file__, __path__...: introspection (inspect, torch.library) must see none
            raise AttributeError(attr)
        return unavailable
    return getattr_


def stub_unused_imports() -> list[str]:
    """Stand-ins for modules kvpress imports at the top level only for presses this runner never makes
    (DuoAttention, ExpectedAttentionStats, LUKV download calibration data with them). A machine without
    them (the GPU machine has no `datasets`) still runs every press here; calling a stand-in raises."""
    import types

    def unavailable(*args, **kwargs):
        raise RuntimeError("stand-in module: this press needs a package that is not installed")

    stubbed = []
    for name in ("datasets", "cachetools", "requests", "fire"):
        if importlib.util.find_spec(name) is not None:
            continue
        mod = types.ModuleType(name)
        mod.__getattr__ = _stand_in_attribute(unavailable)
        if name == "cachetools":  # used as a decorator at import time
            mod.LRUCache = lambda *a, **k: None
            mod.cached = lambda *a, **k: (lambda f: f)
        sys.modules[name] = mod
        stubbed.append(name)
    return stubbed


def make_press(name: str, ratio: float):
    import kvpress

    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "kvcompose": lambda: kvpress.KVComposePress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio),
    }
    if name not in presses:
        raise ValueError(f"unknown press {name!r} (known: {', '.join(presses)})")
    return presses[name]()


def prefill(model, ids, press):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode(), (press(model) if press is not None else contextlib.nullcontext()):
        model.model(input_ids=x, past_key_values=cache)
    return cache


def prefill_ratios(model, ids, presses: dict):
    """{ratio: compressed cache} for one ScorerPress class at several ratios from ONE prefill.

    Exact, not an approximation: kvpress compresses a layer's cache after that layer's attention ran
    on the full keys, so the prefill's hidden states (and every press's scores) do not depend on the
    ratio. The hook of the first press calls each press's own ScorerPress.compress on the full
    keys/values and keeps the full cache for the layers above, as an uncompressed prefill would.
    """
    import torch
    from transformers import DynamicCache

    kept = {r: [] for r in presses}
    first = next(iter(presses.values()))
    for p in presses.values():
        p.post_init_from_model(model)
    own = {r: p.compress for r, p in presses.items()}  # bound before the first one is replaced

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        for r, fn in own.items():
            k, v = fn(module, hidden_states, keys, values, attentions, kwargs)
            kept[r].append((k.clone(), v.clone()))
        return keys, values

    first.compress = compress  # instance attribute: the registered hook calls it
    with torch.inference_mode(), first(model):
        model.model(input_ids=torch.tensor([ids], device=model.device), past_key_values=DynamicCache())
    return {r: DynamicCache(ddp_cache_data=kv) for r, kv in kept.items()}


def entries(cache) -> int:
    """KV entries (tokens × KV heads, summed over layers) the compressed cache holds."""
    return sum(int(lay.keys.shape[1] * lay.keys.shape[2]) for lay in cache.layers)


def uneven(cache) -> bool:
    """Layers of different lengths (KVComposePress keeps a per-layer budget). transformers builds one
    causal mask from layer 0's length, so a multi-token forward on such a cache fails in every other
    layer; one token at a time needs no mask and is the same computation."""
    return len({lay.keys.shape[-2] for lay in cache.layers}) > 1


def forward(model, cache, ids: list[int], start: int, keep_all: bool):
    """Logits [len(ids), vocab] (or [1, vocab]) of `ids` fed at positions start.. after the cache."""
    import torch

    dev = model.device
    with torch.inference_mode():
        if not uneven(cache):
            pos = torch.arange(start, start + len(ids), device=dev)[None]
            out = model(input_ids=torch.tensor([ids], device=dev), past_key_values=cache, position_ids=pos,
                        logits_to_keep=0 if keep_all else 1)
            return out.logits[0]
        rows = []
        for i, t in enumerate(ids):
            out = model(input_ids=torch.tensor([[t]], device=dev), past_key_values=cache,
                        position_ids=torch.tensor([[start + i]], device=dev))
            rows.append(out.logits[0, -1])
        return torch.stack(rows) if keep_all else rows[-1][None]


def teacher_logits(model, cache, context_len: int, cont: list[int]):
    """[len(cont)-1, vocab]: logits predicting cont[1:] with cont[:-1] fed after the compressed context."""
    return forward(model, cache, cont[:-1], context_len, True).float().cpu()


def greedy(model, cache, context_len: int, question: list[int], max_new: int, eos: set[int]) -> list[int]:
    """kvpress pipeline's generate_answer, returning ids (EOS dropped, like the combllama engine)."""
    out_ids = []
    nxt, p = int(forward(model, cache, question, context_len, False)[-1].argmax()), context_len + len(question)
    for _ in range(max_new):
        if nxt in eos:
            break
        out_ids.append(nxt)
        if len(out_ids) == max_new:
            break
        nxt, p = int(forward(model, cache, [nxt], p, False)[-1].argmax()), p + 1
    return out_ids


def main(inp: str, outp: str) -> None:
    stubbed = stub_unused_imports()
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(inp).read_text())
    torch.manual_seed(0)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec.get("dtype", "float32")),
                                                 attn_implementation="sdpa").to(spec.get("device", "cpu"))
    model.eval()
    metrics = _metrics()
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    eos = set(spec["eos_ids"])
    rows = []
    for case in spec["cases"]:
        ctx, T = case["context_ids"], len(case["context_ids"])
        t_case = time.perf_counter()

        def run(press_name, ratio, press=None, cache=None, t0=None):
            t0 = t0 if t0 is not None else time.perf_counter()
            cache = cache if cache is not None else prefill(model, ctx, press)
            row = {"press": press_name, "ratio": ratio, "case": case["id"], "status": "ok",
                   "kv_entries": entries(cache), "full_kv_entries": L * H * T, "stepwise": uneven(cache)}
            if case["continuation_ids"]:
                row["_logits"] = teacher_logits(model, cache, T, case["continuation_ids"])
            else:
                row["answer_ids"] = greedy(model, cache, T, case["question_ids"], case["max_new_tokens"], eos)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            return row

        def error(name, ratio, e):
            return {"press": name, "ratio": ratio, "case": case["id"], "status": "error",
                    "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}

        base = run("none", 0.0)
        ref = base.get("_logits")
        for name in spec["presses"]:
            ratios = [r for r in spec["ratios"] if r > 0]
            out = {r: {**base, "press": name, "ratio": 0.0, "press_inactive": True}  # presses return untouched at 0
                   for r in spec["ratios"] if r == 0}
            try:
                presses = {r: make_press(name, r) for r in ratios}
                if ratios and all(isinstance(p, kvpress.ScorerPress) for p in presses.values()):
                    t0 = time.perf_counter()
                    caches = prefill_ratios(model, ctx, presses)
                    share = (time.perf_counter() - t0) / len(caches)  # the one prefill, split over its ratios
                    for r in ratios:
                        out[r] = run(name, r, cache=caches[r], t0=time.perf_counter() - share)
                else:
                    for r in ratios:
                        out[r] = run(name, r, make_press(name, r))
            except Exception as e:  # a press that cannot run on this model is a result, not a crash
                for r in ratios:
                    out.setdefault(r, error(name, r, e))
            for r in spec["ratios"]:
                row = dict(out[r])
                if "_logits" in row:
                    row["fidelity"] = metrics.token_stats(ref, row.pop("_logits"), case["continuation_ids"][1:])
                rows.append(row)
        took = {name: round(sum(r.get("seconds") or 0 for r in rows if r["case"] == case["id"] and r["press"] == name), 1)
                for name in spec["presses"]}
        print(f"kvpress: {case['id']} ({T} tokens) done in {time.perf_counter() - t_case:.1f} s: {took}",
              file=sys.stderr, flush=True)
    meta = {"kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "stubbed_imports": stubbed}
    Path(outp).write_text(json.dumps({"meta": meta, "rows": rows}))


def _dist_version(name: str):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    # This folder also holds the harness's kvpress_bridge.py: keep it off the import path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    main(sys.argv[1], sys.argv[2])
