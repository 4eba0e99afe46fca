"""Killed runs (issue 7, point 2): SIGKILL a real training process, resume, same result.

A reference run trains uninterrupted. The same run is then started as a child process
(`python -m pneumoscope train ... --resume`, as scripts/main_job.sh restarts it) and
killed with SIGKILL several times: at a random moment of its start-up (decoding, caching
the frozen trunk, the first epoch), in the middle of writing its checkpoint (while the
atomic write's temporary file exists), and at a random moment after an epoch. After every
kill each file of the run directory is still whole, and the last `--resume` ends with the
reference's metrics, selected model tensors and thresholds, bit for bit (CPU, same seed).
The figures (kills, epochs redone) go to test-artifacts/robustness_kills_RECIPE.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.data.manifest import read_manifest
from pneumoscope.rundir import BEST_MODEL, CONFIG, LAST_CHECKPOINT, MANIFEST, METRICS, THRESHOLD

pytestmark = pytest.mark.slow  # kills and resumes training subprocesses

EPOCHS = 6
# Short of the defaults only where a test must be small (size, batch, epochs, patience).
OPTIONS = ["--epochs", str(EPOCHS), "--patience", "3", "--seed", "7"]


def is_timing(key: str) -> bool:
    return "seconds" in key or key.endswith("_per_s") or key.startswith("time")


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


def recipes() -> list[list[str]]:
    """The default recipe ([]); and `--recipe full` too where the CLI has recipes."""
    import argparse

    from pneumoscope.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["train"].format_help()
    return [[]] + (
        [["--recipe", "full"]] if "--recipe" in help_text and "full" in help_text else []
    )


def start(cli_cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller via proc.log
    proc = subprocess.Popen(cli_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    return proc


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def wait_until(
    condition, proc: subprocess.Popen, timeout: float = 240.0, every: float = 0.002
) -> bool:
    """Poll until condition() holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(every)
    raise AssertionError("training child made no progress in time")


def assert_all_files_whole(run: Path) -> None:
    """What a later run reads must parse completely: nothing half-written is trusted."""
    if (run / CONFIG).exists():
        json.loads((run / CONFIG).read_text())
    if (run / MANIFEST).exists():  # the split --resume reads back
        roles = read_manifest(run / MANIFEST)
        assert sum(map(len, roles.values())) == len((run / MANIFEST).read_text().splitlines()) - 1
    for line in (run / METRICS).read_text().splitlines() if (run / METRICS).exists() else []:
        json.loads(line)
    if (run / LAST_CHECKPOINT).exists():
        state = torch.load(run / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch"} <= set(state)
    if (run / BEST_MODEL).exists():
        assert load_file(run / BEST_MODEL)


def checkpoint_epochs(run: Path) -> int:
    """Epochs the checkpoint holds (what --resume continues from)."""
    if not (run / LAST_CHECKPOINT).exists():
        return 0
    return (
        int(torch.load(run / LAST_CHECKPOINT, map_location="cpu", weights_only=True)["epoch"]) + 1
    )


def kill_when(
    when: str, proc: subprocess.Popen, run: Path, rng: random.Random, ref: dict
) -> float | None:
    """Wait for the moment `when`; the delay used, or None when the run ended first."""
    started = time.monotonic()
    if when == "startup":  # decoding, caching the trunk, or the first epoch
        delay = rng.uniform(0.2, 0.9) * ref["first_checkpoint_s"]
        alive = wait_until(lambda: time.monotonic() - started >= delay, proc)
    elif when == "during_checkpoint_write":  # a new temporary file of a later checkpoint
        delay = 0.0
        old = set(run.glob(f".{LAST_CHECKPOINT}.*.tmp"))  # left by an earlier kill
        alive = wait_until(lambda: (run / LAST_CHECKPOINT).exists(), proc) and wait_until(
            lambda: bool(set(run.glob(f".{LAST_CHECKPOINT}.*.tmp")) - old), proc
        )
    else:  # mid_epoch: after this process finished an epoch, a random part of another
        first = inode(run / LAST_CHECKPOINT)
        alive = wait_until(lambda: inode(run / LAST_CHECKPOINT) not in (None, first), proc)
        delay = rng.uniform(0.05, 1.0) * max(ref["epoch_s"], 0.2)
        time.sleep(delay)
    return delay if alive and proc.poll() is None else None


def reference_run(cmd: list[str], run: Path, env: dict, log: Path) -> dict:
    """The uninterrupted run; also times its first checkpoint (to aim the startup kill)."""
    started = time.monotonic()
    proc = start(cmd, log, env)
    wait_until(lambda: (run / LAST_CHECKPOINT).exists(), proc, every=0.01)
    first_checkpoint_s = time.monotonic() - started
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    proc.log.close()
    epoch_s = min(json.loads(line)["seconds"] for line in (run / METRICS).read_text().splitlines())
    return {"first_checkpoint_s": first_checkpoint_s, "epoch_s": epoch_s}


# Kills per recipe: the default recipe (what a user runs) at three kinds of moment; the
# full fine-tune (slower epochs) once, in the most delicate one.
PLANS = {
    "default": ("startup", "during_checkpoint_write", "mid_epoch"),
    "full": ("during_checkpoint_write",),
}


@pytest.mark.parametrize("recipe_name", ["default", "full"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    recipe_name, small_data_root, small_run, cli_env, tmp_path, artifacts_dir
):
    recipe = [] if recipe_name == "default" else ["--recipe", recipe_name]
    assert recipe in recipes(), f"the CLI lost --recipe {recipe_name}"

    def train_cmd(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pneumoscope",
            "train",
            "--data",
            str(small_data_root),
            "--out",
            str(out),
            *small_run,
            *OPTIONS,
            *recipe,
            "--resume",
        ]

    def env_for(name: str) -> dict:  # each its own persistent cache: both start cold
        return dict(cli_env, PNEUMOSCOPE_CACHE=str(tmp_path / f"cache_{name}"))

    reference = tmp_path / "reference"
    ref = reference_run(
        train_cmd(reference), reference, env_for("reference"), tmp_path / "reference.log"
    )

    run, log = tmp_path / "killed", tmp_path / "killed.log"
    rng = random.Random()
    kills = []
    for when in PLANS[recipe_name]:
        before = checkpoint_epochs(run)
        proc = start(train_cmd(run), log, env_for("killed"))
        delay = kill_when(when, proc, run, rng, ref)
        if delay is None:
            assert proc.wait() == 0, log.read_text()[-3000:]
            proc.log.close()
            break  # the run finished before this kill: nothing left to interrupt
        lines_at_kill = (
            len((run / METRICS).read_text().splitlines()) if (run / METRICS).exists() else 0
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        proc.log.close()
        assert_all_files_whole(run)
        held = checkpoint_epochs(run)
        kills.append(
            {
                "when": when,
                "delay_s": round(delay, 3),
                "epochs_in_checkpoint_before": before,
                "metrics_lines_at_kill": lines_at_kill,
                "epochs_in_checkpoint_after": held,
                "finished_epochs_redone": max(0, lines_at_kill - held),
            }
        )
    assert kills, "no kill landed: the run finished too fast to interrupt"

    final = subprocess.run(
        train_cmd(run), capture_output=True, text=True, env=env_for("killed"), timeout=300
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(run.glob(".*.tmp"))

    assert metrics_rows(run) == metrics_rows(reference)
    got, want = load_file(run / BEST_MODEL), load_file(reference / BEST_MODEL)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # bit for bit, header included (its metadata order was the writing process's hash order)
    assert (run / BEST_MODEL).read_bytes() == (reference / BEST_MODEL).read_bytes()
    assert json.loads((run / THRESHOLD).read_text()) == json.loads(
        (reference / THRESHOLD).read_text()
    )
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("best_epoch", "epochs_run", "val_roc_auc", "thresholds"):
        assert summary[key] == ref_summary[key], key

    figures = {
        "recipe": recipe_name,
        "resolved_recipe": json.loads((run / CONFIG).read_text()).get("recipe"),
        "epochs_run": summary["epochs_run"],
        "kills_survived": len(kills),
        "kills": kills,
        "finished_epochs_redone": sum(k["finished_epochs_redone"] for k in kills),
    }
    (artifacts_dir / f"robustness_kills_{recipe_name}.json").write_text(
        json.dumps(figures, indent=2) + "\n"
    )
    print(json.dumps(figures))
