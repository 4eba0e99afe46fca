"""One precision policy for every forward pass: the training step, the cached trunk and
inference (predict, evaluate, serve, report).

``auto`` means bf16 where the hardware runs it natively (a CUDA GPU with bf16, Ampere
and later; a CPU with AVX512-BF16 or AMX) and fp32 elsewhere. Callers that must stay
fp32 on a CPU whatever it supports (the full fine-tune's step, bit for bit as before)
say so with ``cpu_auto="fp32"``.
"""

from __future__ import annotations

import torch

from pneumoscope.errors import OptionError

PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run natively on device (about 2x fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, name, lambda: False)() for name in _CPU_BF16_CHECKS)
    return False


def resolve_precision(precision: str, device: str | torch.device, *, option: str = "--precision",
                      cpu_auto: str = "native") -> str:
    """fp32 | bf16 for a requested auto | bf16 | fp32 on device.

    cpu_auto: what auto means on a CPU: "native" (bf16 where native) or "fp32"."""
    if precision not in PRECISIONS:
        raise OptionError(f"{option} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cpu" and cpu_auto == "fp32":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: str | torch.device, precision: str):
    """The forward pass's mixed-precision context (disabled, a no-op, for fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
