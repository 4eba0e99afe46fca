"""The CPU a run records, and native bf16 switched off under the AVX2 caps (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA) that time an AVX2 laptop on a newer CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CODE = "import json; from pneumoscope.models.precision import cpu_description; print(json.dumps(cpu_description()))"


def _describe(**env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow  # subprocesses
def test_avx2_caps_mean_no_native_bf16():
    capped = _describe(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert capped["onednn_max_cpu_isa"] == "AVX2"
    assert capped["torch_capability"] in ("AVX2", "DEFAULT")  # AVX2 where the CPU has it
    assert capped["native_bf16"] is False
    onednn_only = _describe(ONEDNN_MAX_CPU_ISA="avx2")  # torch's own level stays, oneDNN is capped
    assert onednn_only["native_bf16"] is False


def test_cpu_description_names_the_cpu_and_its_flags():
    described = _describe()
    assert described["model"] and described["threads"] >= 1
    if not os.path.exists("/proc/cpuinfo"):  # not Linux: no flags to compare with
        assert described["flags"] == []
        return
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        flags = next(line for line in info if line.startswith("flags")).split(":", 1)[1].split()
    assert described["flags"] == [
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags
    ]
    if "avx512_bf16" not in flags and "amx_tile" not in flags:
        assert described["native_bf16"] is False
