"""scripts/main_job.sh's choice of data and run folder, run for real on a copy of the script
whose set-up and `pneumoscope` calls are stand-ins that only log their arguments (the real
verbs are tested elsewhere; here the script's own logic is under test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the whole job script (trains on the sample)

REPO = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
out=; prev=
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case $1 in
  train) mkdir -p "$out"; printf '{"data": "%s"}' "$3" > "$out/config.json";;
  evaluate) echo '{"n": 1}' > "$out";;
esac
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """tmp/work/clone: the script, a sample folder, stand-ins for set-up and the CLI."""
    clone = tmp_path / "work" / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "main_job.sh", clone / "scripts")
    (clone / "scripts" / "setup_env.sh").write_text("true\n")
    for split in ("train", "val"):
        (clone / "data" / "sample" / split / "NORMAL").mkdir(parents=True)
    bin_dir = clone / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pneumoscope").write_text(STUB)
    (bin_dir / "pneumoscope").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return clone


def run_job(clone: Path, *args: str, cwd: Path | None = None, env_data: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PNEUMOSCOPE_DATA"}
    if env_data is not None:
        env["PNEUMOSCOPE_DATA"] = env_data
    done = subprocess.run(
        ["bash", str(clone / "scripts" / "main_job.sh"), *args],
        cwd=cwd or clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = clone / ".venv" / "bin" / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def train_call(calls: list[str]) -> str:
    return next(c for c in calls if c.startswith("train "))


def test_without_anything_beside_the_clone_it_runs_the_sample_into_its_own_run(checkout):
    done, calls = run_job(checkout)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("data: data/sample — the embedded sample")
    assert "data download" in done.stdout  # says how to get the full data
    assert train_call(calls) == "train --data data/sample --out runs/sample"
    assert any(c.startswith("report runs/sample") for c in calls)


def test_shared_data_beside_the_clone_comes_first(checkout, tmp_path):
    (tmp_path / "work" / "shared" / "data" / "chest_xray_224" / "train").mkdir(parents=True)
    done, calls = run_job(checkout, env_data=str(tmp_path))
    assert "found beside this checkout" in done.stdout.splitlines()[0]
    assert train_call(calls) == "train --data ../shared/data/chest_xray_224 --out runs/main"


def test_pneumoscope_data_is_read_from_where_the_user_stands(checkout, tmp_path):
    (tmp_path / "mine" / "train").mkdir(parents=True)
    done, calls = run_job(checkout, cwd=tmp_path, env_data="mine")
    assert done.returncode == 0, done.stderr
    assert f"data: {tmp_path}/mine — from $PNEUMOSCOPE_DATA" == done.stdout.splitlines()[0]
    assert train_call(calls) == f"train --data {tmp_path}/mine --out runs/main"


def test_a_folder_without_train_is_one_line_and_exit_2(checkout, tmp_path):
    done, calls = run_job(checkout, env_data=str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "nothing" in done.stderr
    assert calls == []


def test_a_run_of_other_data_is_never_resumed(checkout, tmp_path):
    (tmp_path / "full" / "train").mkdir(parents=True)
    run = checkout / "runs" / "main"
    run.mkdir(parents=True)
    (run / "checkpoint_last.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"data": str(checkout / "data" / "sample")}))
    done, calls = run_job(checkout, str(tmp_path / "full"))
    assert done.returncode == 2
    assert "pass another RUN_DIR" in done.stderr and not any(c.startswith("train") for c in calls)
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "full")}))
    done, calls = run_job(checkout, str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr
    assert train_call(calls) == f"train --data {tmp_path}/full --out runs/main --resume"


def test_a_run_killed_before_its_first_checkpoint_is_resumed(checkout, tmp_path):
    """config.json but no checkpoint yet (perhaps metrics.jsonl): train without --resume
    would refuse the folder, so the job resumes it (which starts it over)."""
    (tmp_path / "full" / "train").mkdir(parents=True)
    run = checkout / "runs" / "main"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "full")}))
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    done, calls = run_job(checkout, str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr
    assert train_call(calls) == f"train --data {tmp_path}/full --out runs/main --resume"
