"""The harness checks itself: `full` reproduces full context (KL 0, top-1 1.0), the smoke grid writes
JSON + markdown + PNG with provenance, any registered method is picked up with its budget, and the
memory fraction is measured from the memory."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from combllama.core.errors import BadInputError
from combllama.core.methods import METHODS, Options
from combllama.core.methods.truncate import Truncate
from combllama.evals.grid import GridConfig, run_grid
from combllama.evals.report import write


def _cell(result, method, budget):
    return next(s for s in result["summary"] if s["method"] == method and s["budget"] == budget)


def test_full_scores_kl_zero_and_top1_one_against_full_context(smollm2):
    cfg = GridConfig(methods=("full", "truncate"), budgets=(1.0, 0.25), tasks=("fidelity",), suite="smoke")
    result = run_grid(cfg, loaded=smollm2)
    full = _cell(result, "full", 1.0)
    assert full["memory_fraction"] == 1.0
    assert full["fidelity"]["tokens"] == 256
    assert full["fidelity"]["kl"] < 1e-6
    assert full["fidelity"]["top1"] == 1.0
    assert full["fidelity"]["ppl"] == pytest.approx(full["fidelity"]["ppl_full"], rel=1e-5)
    # Truncating to a quarter of the document is measurably worse, and its fraction is measured.
    cut = _cell(result, "truncate", 0.25)
    # truncate keeps the framing (template + system text) whole and a quarter of the document after it
    from combllama.core.prompt import memory_prefix_ids

    prefix_share = len(memory_prefix_ids(smollm2.tokenizer)) / result["cases"][0]["memory_tokens"]
    assert 0.25 <= cut["memory_fraction"] <= 0.25 + prefix_share + 0.01, (cut["memory_fraction"], prefix_share)
    assert cut["fidelity"]["kl"] > 1e-3 and cut["fidelity"]["top1"] < 1.0
    # `full` refuses a budget below 1: reported as not applicable, never as a number.
    assert _cell(result, "full", 0.25)["ok"] == 0 and _cell(result, "full", 0.25)["not_applicable"]


def test_smoke_grid_writes_results_with_provenance(tiny_dir, tiny, tmp_path):
    cfg = GridConfig(methods=("full", "truncate"), budgets=(1.0, 0.5), suite="smoke", model=str(tiny_dir))
    result = run_grid(cfg, loaded=tiny)
    paths = write(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    for key in ("command", "date", "machine", "versions", "model", "summary", "rows", "cases"):
        assert key in data
    assert data["model"]["fingerprint"] == tiny.fingerprint and data["machine"]["cpu"]
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| truncate | 0.5 |" in md and "| full | 1.0 |" in md
    tasks = {r["task"] for r in data["rows"]}
    assert tasks == {"fidelity", "retrieval", "qa"}
    for r in data["rows"]:
        if r["status"] == "ok" and r["task"] == "retrieval":
            assert r["score"] in (0.0, 1.0) and r["citation"]["status"] in ("ok", "unavailable")
        if r["status"] == "ok" and r["task"] == "qa":
            assert 0 <= r["f1"] <= 1 and r["em"] in (0.0, 1.0)
    cite = _cell(data, "full", 1.0)["citation"]
    assert "accuracy" in cite or cite["status"] == "unavailable"


def test_any_registered_method_runs_with_the_budget(tiny, monkeypatch):
    seen = []

    class Halfway(Truncate):
        name = "halfway"

        @dataclass(frozen=True)
        class Options(Options):
            pass

        def select(self, n_prefix, n_doc, window, reserve):
            seen.append(self.budget)
            return super().select(n_prefix, n_doc, window, reserve)

    monkeypatch.setitem(METHODS, "halfway", Halfway)
    result = run_grid(GridConfig(methods=("halfway",), budgets=(0.5,), tasks=("retrieval",), suite="smoke"), loaded=tiny)
    assert seen and all(b.fraction == 0.5 for b in seen)
    assert 0.5 <= _cell(result, "halfway", 0.5)["memory_fraction"] < 0.7


def test_grid_config_refuses_unknown_names():
    with pytest.raises(BadInputError, match="unknown method"):
        GridConfig(methods=("nope",))
    with pytest.raises(BadInputError, match="unknown task"):
        GridConfig(tasks=("poetry",))
    with pytest.raises(BadInputError, match="memory fraction"):
        GridConfig(budgets=(1.5,))
    assert GridConfig(methods=("kvpress:snapkv",)).methods == ("kvpress:snapkv",)
