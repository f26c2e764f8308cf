"""Plan an attach from the manifest alone: the device bytes a memory will take, known before any
tensor file is read, so a memory larger than the device is refused with a clear message instead of
failing halfway through a load. No torch, no file access.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ResourceError
from .format import DTYPES

_FLOAT = {"F32", "F16", "BF16"}
_KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_RESERVE = 1024  # positions a conversation may add on top of the memory (EncodeConfig.reserve)


@dataclass(frozen=True)
class AttachPlan:
    tensor_bytes: int  # every listed chunk tensor, at the dtype it will have on the device
    working_bytes: int  # K/V the conversation adds: reserve positions × layers × 2 × kv_heads × head_dim
    free_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.tensor_bytes + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes


def plan_attach(manifest: dict, device_free_bytes: int, dtype_bytes: int | None = None) -> AttachPlan:
    """Bytes to attach `manifest`'s memory; floating tensors are counted at `dtype_bytes` when the
    model runs in another dtype than the memory was written in (a float32 memory on a bfloat16 GPU)."""
    tensor = 0
    for chunk in manifest["chunks"]:
        for dtype, shape in chunk["tensors"].values():
            size = dtype_bytes if dtype_bytes is not None and dtype in _FLOAT else DTYPES[dtype]
            tensor += math.prod(shape) * size
    model = manifest["model"]
    kv = dtype_bytes or _KV_BYTES.get(manifest.get("kv_dtype"), 4)
    reserve = int((manifest.get("chunking") or {}).get("reserve", DEFAULT_RESERVE))
    working = reserve * int(model.get("n_layers", 0)) * 2 * int(model.get("n_kv_heads", 0)) * \
        int(model.get("head_dim", 0)) * kv
    return AttachPlan(tensor, working, int(device_free_bytes))


def check_attach(manifest: dict, device_free_bytes: int, device: str = "cuda",
                 dtype_bytes: int | None = None) -> AttachPlan:
    """The plan, or ResourceError (exit 4) naming what to change when the memory does not fit."""
    plan = plan_attach(manifest, device_free_bytes, dtype_bytes)
    if not plan.fits:
        gib = 2 ** 30
        raise ResourceError(
            f"memory {manifest.get('name')!r} needs {plan.need_bytes / gib:.2f} GiB on {device} "
            f"({plan.tensor_bytes / gib:.2f} GiB of tensors + {plan.working_bytes / gib:.2f} GiB for the "
            f"conversation) but {plan.free_bytes / gib:.2f} GiB are free; ingest with a smaller --budget or a "
            f"compressing --method, free device memory, or use --device cpu")
    return plan
