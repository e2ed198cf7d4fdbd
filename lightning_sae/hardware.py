"""What the device under a tensor is good at, for the plugins that pick a precision by it."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def has_fast_bf16_matmul(device: torch.device) -> bool:
    """Whether a bf16 matmul is much cheaper than an fp32 one here (AMX / AVX512-BF16 CPUs, and
    GPUs with bf16 support); elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False
