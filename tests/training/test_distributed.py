"""torchrun on this machine's CPUs: 2 gloo processes train on real shared images.

The runs are real `torchrun --nproc_per_node 2 -m pneumoscope train ...` subprocesses;
the sampler tests check the epoch order each rank trains on, through the training loop.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumoscope.cli import main
from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.models import build_model
from pneumoscope.rundir import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    MANIFEST,
    METRICS,
    THRESHOLD,
    VAL_PREDICTIONS,
)
from pneumoscope.training import TrainConfig
from pneumoscope.training.distributed import DistEnv, shard_order
from pneumoscope.training.loop import (
    Optimization,
    epoch_order,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from pneumoscope.training.step import BatchFeed

HERE = Path(__file__).resolve().parent
TRAIN_ARGS = [
    "--recipe",
    "full",
    "--backbone",
    "efficientnet_lite0",
    "--image-size",
    "64",
    "--batch-size",
    "6",
    "--val-fraction",
    "0.3",
    "--head-epochs",
    "1",
    "--epochs",
    "2",
    "--device",
    "cpu",
]
RUN_FILES = {
    "config.json",
    MANIFEST,
    METRICS,
    LAST_CHECKPOINT,
    BEST_MODEL,
    THRESHOLD,
    VAL_PREDICTIONS,
    "summary.json",
    "MODEL_CARD.md",
}


def torchrun(*args, env_extra=None, nproc=2, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done


def train_cmd(data, out, *extra):
    return [
        "-m",
        "pneumoscope",
        "-q",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *TRAIN_ARGS,
        *extra,
    ]


def read_metrics(run):
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(small_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(*train_cmd(small_data_root, out))
    return out, done.stdout


# ----------------------------------------------------------------------------- the 2-process run


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_two_process_run_writes_one_run_directory(ddp_run):
    run, stdout = ddp_run
    names = {p.name for p in run.iterdir()}
    assert names == RUN_FILES  # one checkpoint, one model, no temporary or per-rank files
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]  # one line per epoch, not per rank
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert stdout.count("val ROC AUC") == 1  # rank 0 alone prints the summary


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_val_auc_is_computed_on_all_gathered_predictions(ddp_run):
    run, _ = ddp_run
    with open(run / VAL_PREDICTIONS) as f:
        preds = list(csv.DictReader(f))
    with open(run / MANIFEST) as f:
        val_paths = {r["path"] for r in csv.DictReader(f) if r["role"] == "val"}
    # every validation image once: both ranks' halves were gathered, in manifest order
    assert [r["path"] for r in preds] and {r["path"] for r in preds} == val_paths
    assert len(preds) == len(val_paths)
    y = [int(r["label"]) for r in preds]
    p = [float(r["p_pneumonia"]) for r in preds]
    rows = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in rows if r["epoch"] == summary["best_epoch"] - 1)
    assert best["val_roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert summary["val_roc_auc"] == best["val_roc_auc"]


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_resume_under_torchrun_repeats_the_uninterrupted_run(ddp_run, small_data_root, tmp_path):
    full, _ = ddp_run
    run = tmp_path / "run"
    torchrun(
        str(HERE / "ddp_interrupted_run.py"),
        *train_cmd(small_data_root, run)[2:],
        env_extra={"STOP_AFTER_EPOCHS": "1"},
    )
    assert [r["epoch"] for r in read_metrics(run)] == [0]
    assert not (run / THRESHOLD).exists()
    torchrun(*train_cmd(small_data_root, run, "--resume"))
    rows, ref = read_metrics(run), read_metrics(full)
    assert [r["epoch"] for r in rows] == [0, 1]
    for got, want in zip(rows, ref):  # same shards, same seeds, same gloo reductions
        for key in ("train_loss", "val_roc_auc", "val_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["epoch"], key)
    assert {p.name for p in run.iterdir()} == RUN_FILES


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_resume_with_another_world_size_is_refused(ddp_run, small_data_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ddp_run[0], run)
    argv = [
        "-q",
        "train",
        "--data",
        str(small_data_root),
        "--out",
        str(run),
        *TRAIN_ARGS,
        "--resume",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume with 1 process(es); the run was trained with 2" in err


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_cpu_fast_recipe_under_torchrun_is_refused(small_data_root, tmp_path):
    out = tmp_path / "run"
    args = [a if a != "full" else "cpu-fast" for a in train_cmd(small_data_root, out)]
    done = torchrun(*args, check=False)
    assert done.returncode != 0
    # each rank stops with the one-line message (torchrun then reports the failed workers)
    assert (
        done.stderr.count(
            "pneumoscope train: error: --recipe cpu-fast trains in one process; "
            "under torchrun use --recipe full"
        )
        == 2
    )
    assert not (out / "config.json").exists()


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("balance", ["none", "loss", "sampler"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_the_epoch_order_once_plus_padding(balance, world):
    labels = np.array([0] * 9 + [1] * 28)  # 37 images, 1:3 like the data; 37 is no multiple of 2..4
    order = epoch_order(labels, balance, seed=3, epoch=5)
    shards = [shard_order(order, r, world) for r in range(world)]
    per_rank = -(-len(order) // world)
    assert all(len(s) == per_rank for s in shards)  # equal steps on every rank (DDP needs it)
    pad = per_rank * world - len(order)
    counts = np.bincount(np.concatenate(shards), minlength=len(labels))
    expected = np.bincount(order, minlength=len(labels)) + np.bincount(
        order[:pad], minlength=len(labels)
    )
    assert (counts == expected).all()
    if balance != "sampler":  # a permutation: every index at least once, pad of them twice
        assert counts.min() == 1 and counts.sum() == len(labels) + pad


def test_sampler_balance_holds_on_every_rank():
    labels = np.array([0] * 1000 + [1] * 3000)
    for epoch in range(3):
        order = epoch_order(labels, "sampler", seed=0, epoch=epoch)
        for rank in range(4):
            share = np.mean(labels[shard_order(order, rank, 4)] == 0)
            assert 0.44 < share < 0.56, (epoch, rank, share)


class RecordingFeed(BatchFeed):
    """The real batch source, noting which indices the loop asks for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def __call__(self, idx):
        self.seen.extend(int(i) for i in idx)
        return super().__call__(idx)


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_training_loop_trains_each_rank_on_its_shard(small_data_root):
    full = decode_samples(
        discover_split(small_data_root / "train", "train"), 32, show_progress=False
    )
    data = DecodedSet(full.images[:19], full.samples[:19], [])  # 19: no multiple of 2, so padding
    cfg = TrainConfig(
        data="",
        out="",
        recipe="full",
        weights="none",
        image_size=32,
        batch_size=4,
        balance="sampler",
        augment="light",
        epochs=1,
    )
    world, epoch = 2, 0
    order = epoch_order(data.labels, cfg.balance, cfg.seed, epoch)
    trained = []
    for rank in range(world):
        model = build_model("efficientnet_lite0", weights="none")
        optimizer = make_optimizer(model, cfg)
        feed = RecordingFeed(data.images, data.labels, torch.device("cpu"))
        opt = Optimization(optimizer, make_scheduler(optimizer, cfg, 4))
        train_one_epoch(
            model,
            opt,
            data,
            cfg,
            epoch,
            DistEnv(rank=rank, world_size=world),
            feed=feed,
            show_progress=False,
        )
        shard = shard_order(order, rank, world)
        assert feed.seen == list(shard[: len(shard) // cfg.batch_size * cfg.batch_size])
        trained.extend(feed.seen)
    # together the ranks trained on one epoch order, not on world copies of it
    assert len(trained) == world * (-(-len(order) // world) // cfg.batch_size * cfg.batch_size)
    assert len(trained) <= len(order) + world


# ----------------------------------------------------------------------------- three classes


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_three_class_run_under_torchrun(small_data_root, tmp_path):
    """--task three-class with 2 gloo processes: the gathered (N, 3) validation
    probabilities make the three-class run files, on the three-class stratified split."""
    run = tmp_path / "run"
    args = train_cmd(small_data_root, run, "--task", "three-class")
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--head-epochs") + 1] = "0"
    torchrun(*args)
    assert {p.name for p in run.iterdir()} == RUN_FILES
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "three-class" and config["distributed"]["world_size"] == 2
    with open(run / VAL_PREDICTIONS) as f:
        preds = list(csv.DictReader(f))
    with open(run / MANIFEST) as f:
        val_paths = [r["path"] for r in csv.DictReader(f) if r["role"] == "val"]
    assert list(preds[0]) == ["path", "label", "p_normal", "p_bacterial", "p_viral", "p_pneumonia"]
    assert [r["path"] for r in preds] == val_paths  # both ranks' halves, in manifest order
    y = np.array([int(r["label"]) for r in preds])
    expected = [
        0 if "NORMAL" in Path(p).parts else (1 if "_bacteria_" in Path(p).name else 2)
        for p in val_paths
    ]
    # the split holds all three classes
    assert y.tolist() == expected and set(expected) == {
        0,
        1,
        2,
    }
    probs = np.array(
        [[float(r[f"p_{k}"]) for k in ("normal", "bacterial", "viral")] for r in preds]
    )
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(
        [float(r["p_pneumonia"]) for r in preds], probs[:, 1:].sum(axis=1), atol=2e-6
    )
    # the epoch's val_roc_auc is the macro one-vs-rest AUC of the gathered predictions (the
    # CSV keeps 9 significant digits: a rounded tie may move the AUC by about that much, no more)
    (row,) = read_metrics(run)
    assert row["val_roc_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "three-class"
    thresholds = json.loads((run / THRESHOLD).read_text())
    assert {"youden", "sensitivity95"} <= set(thresholds["rules"])  # binary rules on p(pneumonia)
    assert 0.0 <= thresholds["bacterial_vs_viral"]["threshold"] <= 1.0
