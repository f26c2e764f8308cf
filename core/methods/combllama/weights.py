"""Adapter files: one safetensors file with a CombAdapter's trained tensors (low-rank factors, norms,
gates, chunk embeddings), its CombConfig, the base model's fingerprints and a format version.

Nothing here is pickled; the header is checked (format, version, base model) before any tensor is read.
The copied decoder weights are not stored: they are the base model's own, so an adapter only loads
onto the model it was trained for (same sampled-weight print).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import BadInputError, IncompatibleMemoryError, UnsupportedVersionError
from .modules import CombAdapter, CombConfig

FORMAT = "combllama-adapter"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024  # the file travels inside the repository (issue 8)


def weights_fingerprint(model) -> str:
    """`cmw1:` + sha256 of the decoder's shaping config and sampled weights (rounded to bfloat16, so fp32 on
    CPU and bf16 on GPU agree). Unlike core.model.fingerprint it needs no tokenizer: methods see the model only."""
    import torch

    c = model.config
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "intermediate_size", "vocab_size", "rms_norm_eps")
    h = hashlib.sha256(json.dumps({k: getattr(c, k, None) for k in keys}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            n = min(64, flat.numel())
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
            h.update(name.encode())
            h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return "cmw1:" + h.hexdigest()


def file_digest(path: Path) -> bytes:
    """sha256 of the adapter file (32 bytes): stored with every memory chunk it encoded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def save_adapter(path: Path, adapter: CombAdapter, *, base_fingerprint: str, base_weights: str, base_name: str,
                 info: dict | None = None) -> int:
    """Write `adapter` (bf16 tensors; gates in fp32) atomically and durably (core.memory.durable.write_atomic);
    returns the file size. Refuses > MAX_BYTES, leaving any file at `path` as it was."""
    import torch
    from safetensors.torch import save

    from ...memory.durable import write_atomic

    path = Path(path)
    tensors = {}
    for name, t in adapter.state_dict().items():
        t = t.detach().cpu()
        tensors[name] = (t.float() if name.endswith("_gate") else t.to(torch.bfloat16)).contiguous()
    meta = {"format": FORMAT, "version": str(VERSION), "config": adapter.config.to_json(),
            "base_fingerprint": base_fingerprint, "base_weights": base_weights, "base_name": base_name,
            "info": json.dumps(info or {}, sort_keys=True)}
    data = save(tensors, metadata=meta)  # at most MAX_BYTES is worth writing: sized in memory first
    if len(data) > MAX_BYTES:
        raise BadInputError(f"adapter would be {len(data) / 2**20:.1f} MiB, more than {MAX_BYTES / 2**20:.0f} MiB; "
                            f"lower --rank")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return len(data)


def read_header(path: Path) -> dict:
    """The adapter's metadata, checked for format and version; `config` parsed into a CombConfig."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise BadInputError(f"{path}: not a combllama adapter ({e})") from None
    if meta.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a combllama adapter")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise BadInputError(f"{path}: adapter version {meta.get('version')!r} is not a number") from None
    if version > VERSION:
        raise UnsupportedVersionError(f"{path}: adapter format {version} is newer than this combllama ({VERSION})")
    meta["config"] = CombConfig.from_json(meta["config"])
    meta["info"] = json.loads(meta.get("info") or "{}")
    return meta


def load_adapter(path: Path, model) -> CombAdapter:
    """Build the adapter for `model` (checked by weights fingerprint) and load the trained tensors."""
    from safetensors.torch import load_file

    meta = read_header(path)
    have = weights_fingerprint(model)
    if meta["base_weights"] != have:
        raise IncompatibleMemoryError(f"{path}: adapter trained for {meta.get('base_name')!r} "
                                      f"({meta['base_weights'][:18]}…), not this model ({have[:18]}…)")
    adapter = CombAdapter.from_base(model, meta["config"])
    state = load_file(str(path), device="cpu")
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadInputError(f"{path}: adapter tensors do not match its config "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return adapter.eval().requires_grad_(False)
