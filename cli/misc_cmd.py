"""`combllama models`, `combllama paths`, `combllama doctor`: what is installed, where state lives, what works.

All three only look: nothing is downloaded, converted or created (doctor probes writability with a
temporary file in directories that already exist).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .options import json_option


def _table(rows: list[tuple[str, str]]) -> None:
    from .render import safe

    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {safe(v)}")


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


# models -------------------------------------------------------------------------------------------

def embedded_record(paths) -> dict:
    """The embedded model: its GGUF in the installed wheel and its conversion state in the cache."""
    from ..core.errors import BadInputError
    from ..core.model import EMBEDDED, embedded_cache_dirs, embedded_gguf

    rec: dict = {"name": EMBEDDED, "kind": "embedded", "installed": False, "gguf": None, "gguf_bytes": None,
                 "converted": False, "converted_dir": None, "converted_bytes": 0, "tokenizer_cached": False,
                 "problem": None}
    try:
        gguf = embedded_gguf()
    except BadInputError as e:
        rec["problem"] = str(e)
        return rec
    converted, tokenizer = embedded_cache_dirs(paths)
    rec.update(installed=True, gguf=str(gguf), gguf_bytes=gguf.stat().st_size,
               converted=(converted / "COMPLETE").is_file(), converted_dir=str(converted),
               converted_bytes=_dir_size(converted), tokenizer_cached=(tokenizer / "COMPLETE").is_file()
               or (converted / "COMPLETE").is_file())
    return rec


def local_record(path: str) -> dict:
    """A --model directory named in config.toml: whether it is usable, and its shape (from config.json)."""
    from ..core.errors import BadInputError
    from ..core.model import model_config

    d = Path(path).expanduser()
    rec: dict = {"name": d.name, "kind": "local", "path": str(d), "exists": d.is_dir(), "problem": None}
    try:
        c = model_config(d)
    except BadInputError as e:
        rec["problem"] = str(e)
        return rec
    rec.update(model_type=c.get("model_type"), n_layers=c.get("num_hidden_layers"),
               n_kv_heads=c.get("num_key_value_heads") or c.get("num_attention_heads"),
               head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
               window=c.get("max_position_embeddings"), weights_bytes=sum(
                   p.stat().st_size for p in d.glob("*.safetensors")))
    return rec


@click.command()
@json_option
def models(as_json):
    """List the models combllama can use: the embedded one and the --model directories in config.toml.

    Local only: nothing is downloaded or converted.

    \b
      combllama models --json
    """
    from ..core.paths import Paths
    from .config import Config
    from .render import human_bytes

    paths = Paths.from_env()
    config = Config.load()
    rows = [embedded_record(paths)] + [local_record(p) for p in config.model_dirs()]
    if as_json:
        click.echo(json.dumps({"config": str(config.path) if config.path else None, "models": rows}, indent=2))
        return
    for r in rows:
        if r["kind"] == "embedded":
            state = ("not installed" if not r["installed"] else
                     f"converted ({human_bytes(r['converted_bytes'])} in the cache)" if r["converted"] else
                     "not converted yet (the first ingest/ask converts it, once)")
            click.echo(f"{r['name']}  (embedded, default)  {state}")
            if r["gguf"]:
                click.echo(f"    gguf  {r['gguf']}")
        else:
            state = r["problem"] or (f"{r['model_type']}, {r['n_layers']} layers, {r['n_kv_heads']} KV heads × "
                                     f"{r['head_dim']}, window {r['window']:,}, {human_bytes(r['weights_bytes'])}")
            click.echo(f"{r['name']}  (--model {r['path']})  {state}")
        if r["problem"] and r["kind"] == "embedded":
            click.echo(f"    {r['problem']}")


# paths --------------------------------------------------------------------------------------------

def path_rows(env=None) -> list[dict]:
    """Every place combllama reads or writes, and the variable that moves it (first one set wins)."""
    from ..core.paths import Paths
    from .config import FILE

    env = os.environ if env is None else env
    p = Paths.from_env(env)
    rows = [
        ("config", p.config, ["COMBLLAMA_HOME"], "config.toml lives here"),
        ("config_file", p.config / FILE, ["COMBLLAMA_HOME"], "defaults for every command"),
        ("data", p.data, ["COMBLLAMA_HOME"], "sessions database"),
        ("sessions_db", p.data / "sessions.db", ["COMBLLAMA_HOME"], "chat sessions (SQLite)"),
        ("memories", p.memories, ["COMBLLAMA_MEMORY_DIR", "COMBLLAMA_HOME"], "one folder per memory (large)"),
        ("cache", p.cache, ["COMBLLAMA_CACHE_DIR", "COMBLLAMA_HOME"], "converted models; safe to delete"),
        ("models_cache", p.cache / "models", ["COMBLLAMA_CACHE_DIR", "COMBLLAMA_HOME"], "converted embedded model"),
        ("state", p.state, ["COMBLLAMA_HOME"], "input history, logs"),
    ]
    out = []
    for name, path, variables, what in rows:
        set_by = next((v for v in variables if env.get(v)), None)
        out.append({"name": name, "path": str(path), "exists": path.exists(), "env": variables,
                    "set_by": set_by or "platform default", "holds": what})
    return out


@click.command()
@json_option
def paths(as_json):
    """Show every directory and file combllama uses, and which variable moves it.

    \b
      combllama paths
      COMBLLAMA_HOME=/tmp/cl combllama paths --json
    """
    rows = path_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _table([(r["name"], f"{r['path']}{'' if r['exists'] else '  (not created yet)'}  "
                        f"[{' or '.join(r['env'])}; now: {r['set_by']}]") for r in rows])


# doctor -------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> tuple[bool, str]:
    """Whether combllama can write `path` (or create it): probed with a temporary file, removed at once."""
    import tempfile

    base = _existing(path)
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        return False, f"{base}: {e.strerror or e}"
    return True, str(path) if base == path else f"{path} (will be created under {base})"


def diagnose() -> dict:
    """Everything doctor reports, as one JSON-able dict (schema: docs/cli.md)."""
    import platform
    import shutil

    from ..core.paths import Paths

    checks: list[dict] = []

    def check(name: str, status: str, detail: str) -> None:
        checks.append({"name": name, "status": status, "detail": detail})

    versions = {"combllama": _version("combllama"), "python": platform.python_version(),
                **{d: _version(d) for d in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "click",
                                            "rich", "pypdf", "prompt_toolkit")}}
    check("python", "ok" if sys.version_info >= (3, 11) else "fail", f"{versions['python']} ({sys.executable})")
    for d in ("torch", "transformers"):
        check(d, "ok" if versions[d] else "fail", versions[d] or "not installed")
    gpu: dict = {"cuda_available": False, "devices": [], "cuda_version": None, "bf16": False}
    attention: dict = {"sdpa": False, "sdpa_flash": False, "sdpa_mem_efficient": False, "flash_attn": False}
    try:
        import torch

        gpu["cuda_version"] = torch.version.cuda
        gpu["cuda_available"] = bool(torch.cuda.is_available())
        attention["sdpa"] = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        if gpu["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpu["devices"].append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                                       "capability": f"{props.major}.{props.minor}"})
            gpu["bf16"] = bool(torch.cuda.is_bf16_supported())
            attention["sdpa_flash"] = bool(torch.backends.cuda.is_flash_attention_available()
                                           and torch.backends.cuda.flash_sdp_enabled())
            attention["sdpa_mem_efficient"] = bool(torch.backends.cuda.mem_efficient_sdp_enabled())
    except ImportError:
        pass
    import importlib.util

    attention["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    if gpu["cuda_available"]:
        names = ", ".join(d["name"] for d in gpu["devices"])
        check("cuda", "ok", f"{names} · CUDA {gpu['cuda_version']} · bf16 {'yes' if gpu['bf16'] else 'no'}")
    else:
        why = "torch built without CUDA" if gpu["cuda_version"] is None else "no CUDA device visible"
        check("cuda", "warn", f"not available ({why}); combllama runs on the CPU, slowly")
    backends = [k for k in ("sdpa_flash", "sdpa_mem_efficient", "flash_attn") if attention[k]]
    check("attention", "ok" if attention["sdpa"] else "fail",
          "SDPA" + (f" + {', '.join(backends)}" if backends else " (math kernel only)"))

    paths = Paths.from_env()
    emb = embedded_record(paths)
    check("embedded model", "ok" if emb["installed"] else "fail",
          emb["gguf"] if emb["installed"] else emb["problem"])
    check("embedded conversion", "ok" if emb["converted"] else "warn",
          "cached" if emb["converted"] else "not converted yet: the first ingest/ask converts it (tens of seconds)")

    dirs = {}
    for name, path in (("config", paths.config), ("data", paths.data), ("memories", paths.memories),
                       ("cache", paths.cache), ("state", paths.state)):
        ok, detail = _writable(path)
        dirs[name] = {"path": str(path), "writable": ok}
        check(f"{name} dir", "ok" if ok else "fail", detail if ok else f"not writable: {detail}")
    disk = {}
    for name, path in (("memories", paths.memories), ("cache", paths.cache)):
        usage = shutil.disk_usage(_existing(path))
        disk[name] = {"path": str(_existing(path)), "free_bytes": usage.free, "total_bytes": usage.total}
        from .render import human_bytes

        check(f"free disk ({name})", "ok" if usage.free > 1024 ** 3 else "warn",
              f"{human_bytes(usage.free)} free of {human_bytes(usage.total)} at {_existing(path)}")
    return {"ok": all(c["status"] != "fail" for c in checks), "versions": versions, "gpu": gpu,
            "attention": attention, "embedded": emb, "directories": dirs, "disk": disk, "checks": checks}


@click.command()
@json_option
def doctor(as_json):
    """Check the installation: versions, GPU and dtype, attention backends, the embedded model, directories.

    Exits 0 even without CUDA (the CPU works); a failed check is reported, not raised.

    \b
      combllama doctor
      combllama doctor --json | jq .gpu
    """
    report = diagnose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    width = max(len(c["name"]) for c in report["checks"])
    from .render import safe

    for c in report["checks"]:
        click.echo(f"{marks[c['status']]}  {c['name']:<{width}}  {safe(c['detail'])}")
    v = report["versions"]
    click.echo(f"versions: combllama {v['combllama']} · python {v['python']} · torch {v['torch']} · "
               f"transformers {v['transformers']} · tokenizers {v['tokenizers']}")
