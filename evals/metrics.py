"""Scores: next-token KL / top-1 agreement / perplexity for teacher forcing, RULER string match,
SQuAD exact match and F1. Pure functions; tensors in, floats out."""
from __future__ import annotations

import collections
import math
import re
import string


def token_stats(ref_logits, logits, targets) -> dict:
    """Per-sequence fidelity of `logits` to `ref_logits`, both [T, vocab], predicting `targets` [T].

    kl_sum: Σ_t KL(p_ref,t ‖ p_t) (nats); top1: tokens where both argmaxes agree; nll_sum / ref_nll_sum:
    Σ −log p(target) under each. Sums, so cases of different lengths pool exactly.
    """
    import torch

    lr = torch.log_softmax(ref_logits.double(), -1)  # [T, V]
    lm = torch.log_softmax(logits.double(), -1)
    kl = (lr.exp() * (lr - lm)).sum(-1).clamp_min(0)  # [T]; tiny negative values are rounding
    t = torch.as_tensor(targets, device=lm.device)[:, None]
    return {"n": int(lm.shape[0]), "kl_sum": float(kl.sum()), "kl_max": float(kl.max()),
            "top1": int((lr.argmax(-1) == lm.argmax(-1)).sum()),
            "nll_sum": float(-lm.gather(-1, t).sum()), "ref_nll_sum": float(-lr.gather(-1, t).sum())}


def nll_stats(logits, targets) -> dict:
    """−log p(targets) summed, when no full-context reference exists (texts beyond the window)."""
    import torch

    lm = torch.log_softmax(logits.double(), -1)
    t = torch.as_tensor(targets, device=lm.device)[:, None]
    return {"n": int(lm.shape[0]), "nll_sum": float(-lm.gather(-1, t).sum())}


def perplexity(nll_sum: float, n: int) -> float:
    return math.exp(nll_sum / n) if n else float("nan")


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's non-QA metric: the share of reference strings found (case-insensitively) in the output."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(max(_normalize(prediction) == _normalize(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    def one(gold: str) -> float:
        p, g = _normalize(prediction).split(), _normalize(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


def first_line(answer: str) -> str:
    """The answer a QA scorer reads: the first non-empty line, without a trailing period. A small
    chat model often adds an explanation after the short answer; SQuAD golds are spans."""
    for line in answer.strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return ""
