"""`hcattention`: quantized keys on the device, values in host memory, per-step selection (method.py);
the read path registered as an attention function (read.py); codebooks and codes (quant.py)."""
from __future__ import annotations

from .method import HCAttention, HCAttentionOptions, HCMemory, accounting, serve

__all__ = ["HCAttention", "HCAttentionOptions", "HCMemory", "accounting", "serve"]
