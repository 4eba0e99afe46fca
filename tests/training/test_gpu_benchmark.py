"""benchmarks/gpu.py runs end to end in --smoke mode (on the GPU when there is one)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the benchmark in a subprocess
def test_gpu_benchmark_smoke_prints_and_records_both_rates(shared_data, tmp_path):
    record = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu.py"),
            "--smoke",
            "--data",
            str(shared_data),
            "--record",
            str(record),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for label in (
        "model step (synthetic, on device):",
        "end to end (real images, training loop):",
        "ratio end-to-end / model step:",
    ):
        assert label in out
    text = record.read_text()
    assert "(smoke settings, not a result)" in text
    assert "resnet50 at 32px" in text and "real train images" in text
    assert text.count("images/s**") == 2
