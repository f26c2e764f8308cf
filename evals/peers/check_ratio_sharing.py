"""Checks that run_kvpress.prefill_ratios (one prefill, every ratio) keeps exactly the cache that one
    prefill per ratio keeps, for each ScorerPress used by the grid. Run with .venv-kvpress python:
    .venv-kvpress/bin/python evals/peers/check_ratio_sharing.py MODEL_DIR  (prints max |diff| per press/ratio)."""
import sys
from pathlib import Path

import torch
HERE = Path(__file__).resolve().parent
import importlib.util
spec = importlib.util.spec_from_file_location("rk", str(HERE / "run_kvpress.py")); rk = importlib.util.module_from_spec(spec); spec.loader.exec_module(rk)
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.randint(100, 1000, (90,)).tolist()
for name in ("snapkv", "streaming_llm", "expected_attention"):
    ratios = (0.5, 0.875)
    multi = rk.prefill_ratios(m, ids, {r: rk.make_press(name, r) for r in ratios})
    for r in ratios:
        one = rk.prefill(m, ids, rk.make_press(name, r))
        d = max(float((a.keys - b.keys).abs().max()) for a, b in zip(one.layers, multi[r].layers))
        print(name, r, [l.keys.shape[2] for l in one.layers][:3], [l.keys.shape[2] for l in multi[r].layers][:3], "maxdiff", d)
