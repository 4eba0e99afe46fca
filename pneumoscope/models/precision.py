"""One precision policy for every forward pass: the training step, the cached trunk and
inference (predict, evaluate, serve, report).

``auto`` means bf16 where the hardware runs it natively (a CUDA GPU with bf16, Ampere
and later; a CPU with AVX512-BF16 or AMX) and fp32 elsewhere. Callers that must stay
fp32 on a CPU whatever it supports (the full fine-tune's step, bit for bit as before)
say so with ``cpu_auto="fp32"``.
"""

from __future__ import annotations

import os
import platform

import torch

from pneumoscope.errors import OptionError

PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
# oneDNN ISA caps below the first one with bf16 instructions: a process run under one of
# them (ONEDNN_MAX_CPU_ISA=AVX2, as to time an AVX2 laptop on a newer CPU) has no native bf16.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
_CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpu_capped_below_bf16() -> bool:
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA cap this process below bf16 instructions."""
    capability = torch.backends.cpu.get_cpu_capability().upper()  # honours ATEN_CPU_CAPABILITY
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not capability.startswith("AVX512") or isa in _ONEDNN_ISAS_WITHOUT_BF16


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run natively on device (about 2x fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if _cpu_capped_below_bf16():
            return False
        return any(getattr(torch.cpu, name, lambda: False)() for name in _CPU_BF16_CHECKS)
    return False


def cpu_description() -> dict:
    """The CPU a figure was measured on: model, the SIMD flags that decide speed, and what
    this process may use of them (torch's kernel level, the oneDNN cap, native bf16)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return {
        "model": model,
        "flags": [f for f in _CPU_FLAGS_SHOWN if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "native_bf16": native_bf16("cpu"),
        "threads": torch.get_num_threads(),
    }


def resolve_precision(
    precision: str,
    device: str | torch.device,
    *,
    option: str = "--precision",
    cpu_auto: str = "native",
) -> str:
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
    return torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )
