"""Reference kept-token indices of kvpress's KVComposePress, for tests/core/test_kvcompose.py.

kvpress pins transformers<5.3, so it runs in its own virtualenv (.venv-kvpress, built by
evals/peers/setup_kvpress.sh) and this script talks to the tests only through a JSON file:

    .venv-kvpress/bin/python tests/core/data/kvcompose_reference.py tests/core/data/kvcompose_reference.json

Standalone (torch + transformers only): `build_model` makes the same tiny random Llama in either
virtualenv (weights drawn from a seeded generator, parameter by parameter in name order), and the JSON
carries a weight checksum so a drift shows up as a clear failure instead of a wrong comparison.
"""
from __future__ import annotations

import hashlib
import json
import sys

SEED = 1234
CONTEXT_TOKENS = 96
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# (kvpress options, compression_ratio): defaults at the ratios of kvpress's tests, then every option but
# add_v_norm, which fails in kvpress 0.5.5 (it multiplies by the norms of the cache values *with* the probe
# appended: 2T values for T scores).
CASES = [
    ({}, 0.5),
    ({}, 0.8),
    ({"structured": False}, 0.5),
    ({"structured": False}, 0.8),
    ({"agg_task": "mean"}, 0.5),
    ({"add_mean_across_heads": False}, 0.5),
    ({"keep_token_lower_bound": 8, "agg_head": "max", "agg_group": "max"}, 0.75),
]


def build_model(attn: str = "eager"):
    """The tiny random Llama (float32, CPU) and the fixed context ids [1, CONTEXT_TOKENS]."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # large q/k weights: peaked attention, so the ranking is not decided by float noise
                std = 0.15 if ("q_proj" in name or "k_proj" in name) else 0.05 if "proj" in name else 1.0
                p.copy_(std * torch.randn(p.shape, generator=gen))
    ids = torch.randint(3, CONFIG["vocab_size"], (1, CONTEXT_TOKENS), generator=gen)
    return model, ids


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference(path: str) -> None:
    import kvpress
    import torch
    import transformers
    from kvpress import KVComposePress
    from transformers import DynamicCache

    class Capture(KVComposePress):
        def compress_cache(self, model):  # the masks are cleared right after compression: copy them first
            self.kept = [[m.nonzero().flatten().tolist() for m in row] for row in self.important_mask_per_kv_head]
            self.kept_scores = self.scores.tolist()
            super().compress_cache(model)

    model, ids = build_model("eager")
    out = {"script": "tests/core/data/kvcompose_reference.py", "kvpress": getattr(kvpress, "__version__", "?"),
           "transformers": transformers.__version__, "torch": torch.__version__, "config": CONFIG,
           "weights_sha256": weights_sha256(model), "ids": ids[0].tolist(), "cases": []}
    for options, ratio in CASES:
        press = Capture(compression_ratio=ratio, **options)
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
        out["cases"].append({"options": options, "compression_ratio": ratio, "kept": press.kept,
                             "lengths": [cache.layers[i].keys.shape[2] for i in range(CONFIG["num_hidden_layers"])],
                             "scores": [[[round(x, 8) for x in h] for h in lay] for lay in press.kept_scores]})
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    reference(sys.argv[1])
