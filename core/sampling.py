"""Choosing the next token from logits: greedy, temperature, top-p. Pure tensor functions."""
from __future__ import annotations


def sample(logits, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """logits: [vocab]. temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p (nucleus sampling)."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
