"""CombLlama (COMB): chunk encoder + gated cross-attention over a frozen base model.

modules.py holds the tensor math, method.py the registered Method, weights.py the adapter files,
upstream.py the reference implementation's checkpoint layout. train/ trains adapters; nothing here
imports it.
"""
from .method import CombLlama, shipped_for

__all__ = ["CombLlama", "shipped_for"]
