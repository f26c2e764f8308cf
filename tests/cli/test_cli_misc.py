"""`combllama models`, `paths`, `doctor`, `methods`: local facts, JSON shapes, exit codes."""
from __future__ import annotations

import json

from click.testing import CliRunner

from combllama.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_paths_follow_the_variables(isolated_home, tmp_path, monkeypatch):
    rows = {r["name"]: r for r in json.loads(run("paths", "--json").stdout)}
    assert set(rows) >= {"config", "config_file", "data", "sessions_db", "memories", "cache", "models_cache", "state"}
    assert rows["config_file"]["path"] == str(isolated_home / "config" / "config.toml")
    assert rows["memories"]["path"] == str(isolated_home / "memories")
    assert rows["memories"]["env"] == ["COMBLLAMA_MEMORY_DIR", "COMBLLAMA_HOME"]
    assert rows["memories"]["set_by"] == "COMBLLAMA_HOME"
    monkeypatch.setenv("COMBLLAMA_MEMORY_DIR", str(tmp_path / "big"))
    rows = {r["name"]: r for r in json.loads(run("paths", "--json").stdout)}
    assert rows["memories"]["path"] == str(tmp_path / "big") and rows["memories"]["set_by"] == "COMBLLAMA_MEMORY_DIR"
    r = run("paths")
    assert r.exit_code == 0 and str(tmp_path / "big") in r.stdout and "COMBLLAMA_MEMORY_DIR" in r.stdout
    assert not (isolated_home / "config").exists()  # looking creates nothing


def test_models_embedded_and_configured(isolated_home, tiny_dir, tmp_path):
    out = json.loads(run("models", "--json").stdout)
    assert out["config"] is None
    emb = out["models"][0]
    assert emb["kind"] == "embedded" and emb["installed"] and emb["gguf"].endswith(".gguf")
    assert isinstance(emb["converted"], bool)
    (isolated_home / "config").mkdir(parents=True)
    (isolated_home / "config" / "config.toml").write_text(
        f'[default]\nmodel = "{tiny_dir}"\n[ask]\nmodel = "{tmp_path / "gone"}"\n')
    out = json.loads(run("models", "--json").stdout)
    local = {m["path"]: m for m in out["models"][1:]}
    tiny = local[str(tiny_dir)]
    assert tiny["problem"] is None and tiny["n_layers"] == 2 and tiny["n_kv_heads"] == 2 and tiny["head_dim"] == 16
    assert local[str(tmp_path / "gone")]["problem"]
    r = run("models")
    assert r.exit_code == 0 and "smollm2-135m-instruct" in r.stdout and "2 layers" in r.stdout


def test_models_shows_conversion_state(smollm2):
    # The shared test cache holds the converted embedded model once the smollm2 fixture ran.
    emb = json.loads(run("models", "--json").stdout)["models"][0]
    assert emb["converted"] and emb["converted_bytes"] > 0 and emb["tokenizer_cached"]


def test_doctor(isolated_home):
    r = run("doctor", "--json")
    assert r.exit_code == 0, r.output  # even on a machine without CUDA
    rep = json.loads(r.stdout)
    import torch

    assert rep["gpu"]["cuda_available"] == torch.cuda.is_available()
    assert rep["versions"]["torch"] and rep["versions"]["transformers"] and rep["versions"]["python"]
    assert rep["attention"]["sdpa"] is True and isinstance(rep["attention"]["flash_attn"], bool)
    assert rep["embedded"]["installed"]
    assert all(d["writable"] for d in rep["directories"].values())
    assert rep["disk"]["memories"]["free_bytes"] > 0
    names = {c["name"] for c in rep["checks"]}
    assert {"python", "torch", "transformers", "cuda", "attention", "embedded model", "memories dir"} <= names
    assert rep["ok"] is True
    if not torch.cuda.is_available():
        assert next(c for c in rep["checks"] if c["name"] == "cuda")["status"] == "warn"
    text = run("doctor")
    assert text.exit_code == 0 and "cuda" in text.stdout and "versions:" in text.stdout
    assert not (isolated_home / "memories").exists()  # doctor probes, creates nothing


def test_doctor_reports_an_unwritable_directory(tmp_path, monkeypatch):
    import os

    if os.geteuid() == 0:
        # root writes through permissions: point memories at a regular file's child instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        monkeypatch.setenv("COMBLLAMA_MEMORY_DIR", str(blocker / "memories"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("COMBLLAMA_MEMORY_DIR", str(ro / "memories"))
    r = run("doctor", "--json")
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert rep["directories"]["memories"]["writable"] is False and rep["ok"] is False
    assert next(c for c in rep["checks"] if c["name"] == "memories dir")["status"] == "fail"


def test_methods_lists_the_registry():
    from combllama.core.methods import METHODS

    rows = json.loads(run("methods", "--json").stdout)
    assert [r["name"] for r in rows] == list(METHODS)
    text = run("methods").stdout
    assert all(name in text for name in METHODS)


def test_library_deprecation_warnings_reach_stderr_only_with_verbose(monkeypatch):
    """transformers 5.24 warns on every forward call with `past_key_values`; a user must not see it between
    an answer and the one-line messages (a clean-clone CI run caught it), a developer sees it with -v."""
    import warnings

    from click.testing import CliRunner

    from combllama.cli import info_cmd
    from combllama.cli.main import cli

    def noisy(*args, **kwargs):
        warnings.warn("`past_key_values` is deprecated", FutureWarning)
        warnings.warn("old API", DeprecationWarning)

    monkeypatch.setattr(info_cmd.methods, "callback", noisy)
    with warnings.catch_warnings(record=True) as quiet_seen:  # the filters the command installs end with this block
        warnings.simplefilter("always")
        quiet = CliRunner().invoke(cli, ["methods"])
    with warnings.catch_warnings(record=True) as loud_seen:
        warnings.simplefilter("always")
        loud = CliRunner().invoke(cli, ["-v", "methods"])
    assert quiet.exit_code == 0 and loud.exit_code == 0
    assert quiet_seen == []
    assert {w.category for w in loud_seen} == {FutureWarning, DeprecationWarning}
