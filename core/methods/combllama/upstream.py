"""Upstream CombLlama checkpoints (shijuzhao/Comb, `comb/integration/hf/CombLlama.py`) read from a local
directory into a CombAdapter with full weights (rank 0) for the matching base model.

The reference layout (CombLlamaForConditionalGeneration's state dict) that is read:

    config.json                 model_type "combllama", text_config (Llama), cross_attention_layers,
                                num_hidden_layers = self layers + cross layers
    chunk_model.layers.{i}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
                             input_layernorm, post_attention_layernorm}.weight     encoder layer i
    chunk_model.{k_proj,v_proj}.{i}.weight                                          memory projections
    language_model.model.cross_layers.{i}.cross_attn.{q_proj,o_proj,q_norm,k_norm}.weight,
        .{input_layernorm,post_attention_layernorm}.weight, .mlp.{gate,up,down}_proj.weight,
        .cross_attn_attn_gate, .cross_attn_mlp_gate                                 cross block i
    chunk_model.embed_tokens.weight, language_model.model.embed_tokens.weight, ...  (the base model's)

In the reference, memory keys get the cross layer's k_norm and queries its q_norm, there is no norm before
the projections and no chunk-order signal: the CombConfig says so (qk_norm, not kv_norm, not chunk_order).
The backbone and the embedding copy are not loaded: the base model passed in must be the same (a sample of
its embedding is compared).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import BadInputError, IncompatibleMemoryError
from .modules import CombAdapter, CombConfig

ENC = "chunk_model"
CROSS = "language_model.model.cross_layers"


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{directory}: no readable config.json ({e})") from None
    if config.get("model_type") != "combllama" or "text_config" not in config:
        raise BadInputError(f"{directory}: not an upstream CombLlama checkpoint (model_type "
                            f"{config.get('model_type')!r})")
    return config


def _files(directory: Path) -> dict[str, Path]:
    """Tensor name → safetensors file (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise BadInputError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def upstream_digest(directory: Path) -> bytes:
    """Identity of a checkpoint: config.json and the names and sizes of its tensor files."""
    directory = Path(directory)
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for p in sorted(directory.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.digest()


def upstream_config(config: dict, model) -> CombConfig:
    cross = [int(i) for i in config.get("cross_attention_layers") or [3, 7, 11, 15, 19, 23, 27, 31]]
    n_self = int(config.get("num_hidden_layers", 40)) - len(cross)
    if n_self != model.config.num_hidden_layers:
        raise IncompatibleMemoryError(f"upstream checkpoint has {n_self} self-attention layers, the model "
                                      f"{model.config.num_hidden_layers}")
    return CombConfig.for_model(model.config, cross_layers=tuple(cross), rank=0, qk_norm=True, kv_norm=False,
                                chunk_order=False)


def load_upstream(directory: Path, model) -> CombAdapter:
    """The adapter stored in an upstream CombLlama directory, for `model` (its backbone)."""
    import torch
    from safetensors import safe_open

    config = read_config(directory)
    c = upstream_config(config, model)
    files = _files(directory)
    handles: dict[Path, object] = {}

    def get(name: str):
        if name not in files:
            raise BadInputError(f"{directory}: tensor {name} is missing")
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name).to(model.device, model.dtype)

    # The embedding copy must be the base model's: compare a sample of rows.
    emb = model.get_input_embeddings().weight
    if f"{ENC}.embed_tokens.weight" in files:
        theirs = get(f"{ENC}.embed_tokens.weight")
        rows = torch.linspace(0, emb.shape[0] - 1, 16).long()
        if theirs.shape != emb.shape or not torch.equal(theirs[rows].to(torch.bfloat16), emb[rows].to(torch.bfloat16)):
            raise IncompatibleMemoryError(f"{directory}: the checkpoint's embeddings differ from the base model's")
    encoder, projections, cross = [], [], []
    for i in range(len(c.cross_layers)):
        e = f"{ENC}.layers.{i}"
        encoder.append({"q": get(f"{e}.self_attn.q_proj.weight"), "k": get(f"{e}.self_attn.k_proj.weight"),
                        "v": get(f"{e}.self_attn.v_proj.weight"), "o": get(f"{e}.self_attn.o_proj.weight"),
                        "gate": get(f"{e}.mlp.gate_proj.weight"), "up": get(f"{e}.mlp.up_proj.weight"),
                        "down": get(f"{e}.mlp.down_proj.weight"), "ln1": get(f"{e}.input_layernorm.weight"),
                        "ln2": get(f"{e}.post_attention_layernorm.weight")})
        x = f"{CROSS}.{i}"
        projections.append({"k": get(f"{ENC}.k_proj.{i}.weight"), "v": get(f"{ENC}.v_proj.{i}.weight"),
                            "k_norm": get(f"{x}.cross_attn.k_norm.weight")})
        cross.append({"q": get(f"{x}.cross_attn.q_proj.weight"), "o": get(f"{x}.cross_attn.o_proj.weight"),
                      "q_norm": get(f"{x}.cross_attn.q_norm.weight"), "ln1": get(f"{x}.input_layernorm.weight"),
                      "ln2": get(f"{x}.post_attention_layernorm.weight"), "gate": get(f"{x}.mlp.gate_proj.weight"),
                      "up": get(f"{x}.mlp.up_proj.weight"), "down": get(f"{x}.mlp.down_proj.weight"),
                      "attn_gate": get(f"{x}.cross_attn_attn_gate").float().reshape(1),
                      "mlp_gate": get(f"{x}.cross_attn_mlp_gate").float().reshape(1)})
    return CombAdapter(c, encoder, projections, cross).eval().requires_grad_(False)
