"""The import rules of DESIGN.md §2, enforced by walking every module's imports with ast."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["cli", "core", "ingest", "sessions", "train", "evals", "bench"]
HEAVY = ("torch", "transformers", "safetensors", "accelerate", "gguf", "numpy")


def modules(folder: str):
    base = ROOT / folder
    return sorted(base.rglob("*.py")) if base.is_dir() else []


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `path`; relative imports resolved to combllama.*"""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    pkg = ["combllama", *rel.parts[:-1]] if rel.name != "__init__" else ["combllama", *rel.parts[:-1]]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also look inside module-level if/try blocks
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _hits(folder, banned, top_level_only=False):
    bad = []
    for path in modules(folder):
        for line, name in imports(path, top_level_only):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("folder", ["ingest", "sessions"])
def test_leaf_packages_stay_light(folder):
    assert _hits(folder, [*HEAVY, "combllama.core", "combllama.cli", "core", "cli", "click", "rich"]) == []


def test_core_never_imports_ui():
    assert _hits("core", ["click", "rich", "prompt_toolkit", "combllama.cli", "cli"]) == []


def test_core_never_prints():
    bad = []
    for path in modules("core"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


def test_cli_imports_heavy_modules_lazily():
    light = ("combllama.core.errors", "combllama.core.paths", "combllama.core.config", "combllama.ingest.errors",
             "combllama.sessions.errors")
    bad = [h for h in _hits("cli", [*HEAVY, "combllama.core", "combllama.ingest", "combllama.sessions"], True)
           if not any(f"imports {name}" in h and (h.endswith(name) or f"imports {name}." in h) for name in light)]
    assert bad == []


@pytest.mark.parametrize("folder", ["cli", "core", "ingest", "sessions"])
def test_nothing_imports_train_evals_bench(folder):
    assert _hits(folder, ["combllama.train", "combllama.evals", "combllama.bench"]) == []


def test_no_unsafe_loaders_in_product():
    """No pickle, torch.load, remote code or named tiktoken encodings anywhere outside tests."""
    bad = []
    for folder in FOLDERS:
        for path in modules(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
                        isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
                if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle") and \
                        isinstance(node.value, ast.Constant) and node.value.value is True:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.arg}=True")
                if isinstance(node, ast.Attribute) and node.attr in ("get_encoding", "encoding_for_model"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} tiktoken.{node.attr}")
    assert bad == []
