"""The parts of the training loop that decide what a run does: early stopping and the
best weights it keeps, the warmup + cosine schedule, parameter groups without weight
decay, class weights, the per-purpose random streams, and the cpu-fast recipe's patience."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pneumoscope.training.loop as loop
from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import Sample
from pneumoscope.data.manifest import read_manifest
from pneumoscope.evaluation.metrics import SENSITIVITY_RULES
from pneumoscope.inference import predict_probs
from pneumoscope.models import build_model
from pneumoscope.rundir import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    THRESHOLD,
    VAL_PREDICTIONS,
    RunDir,
    read_json,
)
from pneumoscope.training import TrainConfig, fit, seeds
from pneumoscope.training.outputs import write_selection
from pneumoscope.training.recipes import RECIPES

SMALL = dict(
    backbone="efficientnet_lite0",
    image_size=64,
    batch_size=8,
    val_fraction=0.25,
    views=1,
    trunk_precision="fp32",
    device="cpu",
)


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_and_keeps_the_best_epochs_weights(
    small_data_root, tmp_path, monkeypatch
):
    """Validation ROC AUC scripted as 0.6, 0.8, 0.7, 0.7, ...: with patience 2 the run
    stops after epoch 4 (two epochs without a better AUC), and the model it keeps (the
    file and the thresholds' predictions) is epoch 2's, not the last one's."""
    script = [0.6, 0.8, 0.7, 0.7, 0.9, 0.95]
    snapshots = []
    real_validate = loop.validate

    def scripted(model, data, device, env=None, predict=None):
        metrics, probs = real_validate(model, data, device, env, predict)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {**metrics, "val_roc_auc": script[len(snapshots) - 1], "val_loss": 0.5}, probs

    monkeypatch.setattr(loop, "validate", scripted)
    out = tmp_path / "run"
    summary = fit(
        TrainConfig(data=str(small_data_root), out=str(out), epochs=6, patience=2, **SMALL),
        show_progress=False,
    )
    assert len(snapshots) == 4 and summary["epochs_run"] == 4 and summary["early_stopped"]
    assert summary["best_epoch"] == 2
    best = load_file(out / BEST_MODEL)
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[3][k]) for k in best)  # it did train on
    last = torch.load(out / LAST_CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(last[k], snapshots[3][k]) for k in last)
    # the thresholds and val_predictions.csv come from the restored best weights
    data = decode_samples(read_manifest(out / "manifest.csv")["val"], 64, show_progress=False)
    model = build_model("efficientnet_lite0", weights="none", dropout=0.2)
    model.load_state_dict(snapshots[1])
    expected = predict_probs(
        model.to(memory_format=torch.channels_last), data.images, precision="fp32"
    )
    with open(out / VAL_PREDICTIONS) as f:
        written = np.array([float(r["p_pneumonia"]) for r in csv.DictReader(f)])
    np.testing.assert_allclose(written, expected, atol=2e-6)


def test_cpu_fast_early_stopping_can_fire():
    # patience = epochs meant that it never could, though the README said both recipes use it
    for name, recipe in RECIPES.items():
        assert recipe["patience"] < recipe["epochs"], name


def test_validation_predictions_read_back_to_the_thresholds_they_chose(tmp_path):
    """A threshold is one film's float32 probability: val_predictions.csv must read back as
    that same number, or a film at the threshold falls below it (9 significant digits did
    for more than half of such numbers)."""
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    p = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1).astype(np.float32)
    samples = [Sample(tmp_path / f"f{i}.png", int(y), f"p{i}") for i, y in enumerate(labels)]
    val = DecodedSet(images=np.zeros((len(p), 1, 1), np.uint8), samples=samples, failures=[])
    rules = write_selection(RunDir(tmp_path), val, np.column_stack([1 - p, p]))["rules"]
    assert read_json(tmp_path / THRESHOLD)["rules"] == rules
    with open(tmp_path / VAL_PREDICTIONS) as f:
        read_back = np.array([float(r["p_pneumonia"]) for r in csv.DictReader(f)])
    assert np.array_equal(read_back, p.astype(np.float64))
    for rule, target in SENSITIVITY_RULES.items():
        reached = (read_back[labels == 1] >= rules[rule]).mean()
        # the highest threshold that reaches it
        assert target <= reached < target + 1 / labels.sum() + 1e-9, rule


# ----------------------------------------------------------------------------- optimizer, schedule


def test_warmup_then_cosine_lr_values():
    cfg = TrainConfig(
        data="", out="", recipe="full", weights="none", epochs=4, warmup_epochs=1.0, lr=1e-3
    )
    model = build_model("efficientnet_lite0", weights="none")
    optimizer = loop.make_optimizer(model, cfg)
    steps_per_epoch, warmup, total = 5, 5, 20
    scheduler = loop.make_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        1e-3 * (k + 1) / (warmup + 1)
        if k < warmup
        else 1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        for k in range(total)
    ]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-12)
    assert lrs[warmup] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    # decayed to zero at the end
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_norms_and_biases_and_backbone_lr_scaled():
    cfg = TrainConfig(
        data="", out="", recipe="full", lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05
    )
    model = build_model("efficientnet_lite0", weights="none")
    model.freeze_stages(model.n_stages)  # frozen now, unfrozen later: still in the optimizer
    optimizer = loop.make_optimizer(model, cfg)
    assert any(p.requires_grad is False for p in model.stages.parameters())  # left as it was
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == len(list(model.parameters()))  # every parameter, exactly once
    norm_types = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    checked = {"norm": 0, "bias": 0, "weight": 0}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            group = group_of[id(p)]
            assert group["lr"] == pytest.approx(1e-3 if name.startswith("head") else 1e-4), name
            if isinstance(module, norm_types) or pname == "bias":
                assert group["weight_decay"] == 0.0, f"{name}.{pname}"
                checked["norm" if isinstance(module, norm_types) else "bias"] += 1
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                assert group["weight_decay"] == 0.05, f"{name}.{pname}"
                checked["weight"] += 1
    assert all(checked.values()), checked


def test_class_weights_give_each_class_half_of_the_loss():
    labels = np.array([0] * 10 + [1] * 30)
    w = loop.class_weights(labels)
    assert w.tolist() == pytest.approx([2.0, 40 / 60])
    per_sample = w[torch.as_tensor(labels)]
    assert per_sample[labels == 0].sum().item() == pytest.approx(
        per_sample[labels == 1].sum().item()
    )
    # and the loss the step uses is weighted by them: a wrong normal costs 3x a wrong pneumonia
    logits = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # the first says pneumonia, the second normal
    losses = torch.nn.functional.cross_entropy(
        logits, torch.tensor([0, 1]), weight=w, reduction="none"
    )
    assert (losses[0] / losses[1]).item() == pytest.approx(3.0)


def test_three_classes_each_carry_a_third_of_the_loss_and_of_the_sampler_draws():
    # the shared split's normal : bacterial : viral
    labels = np.array([0] * 13 + [1] * 25 + [2] * 12)
    w = loop.class_weights(labels, n_classes=3)
    per_sample = w[torch.as_tensor(labels)]
    shares = [per_sample[labels == c].sum().item() / per_sample.sum().item() for c in range(3)]
    assert shares == pytest.approx([1 / 3] * 3)
    drawn = np.concatenate(
        [loop.epoch_order(labels, "sampler", 0, epoch, n_classes=3) for epoch in range(40)]
    )
    assert np.bincount(labels[drawn], minlength=3) / len(drawn) == pytest.approx(
        [1 / 3] * 3, abs=0.03
    )


# ----------------------------------------------------------------------------- random streams


def test_each_purpose_draws_its_own_stream():
    # seed * K + epoch made (seed 0: every purpose) the same numbers, and seed 1 epoch 0
    # the stream of seed 0 epoch K
    draws = {
        p: torch.rand(8, generator=seeds.generator(0, p, 1)) for p in ("order", "augment", "views")
    }
    assert not torch.equal(draws["order"], draws["augment"]) and not torch.equal(
        draws["augment"], draws["views"]
    )
    labels = np.array([0, 1] * 50)
    assert not np.array_equal(
        loop.epoch_order(labels, "loss", 1, 0), loop.epoch_order(labels, "loss", 0, 100_003)
    )
    assert np.array_equal(
        loop.epoch_order(labels, "loss", 3, 2), loop.epoch_order(labels, "loss", 3, 2)
    )
    # per rank
    assert seeds.stream_seed(0, "dropout", 0, 0) != seeds.stream_seed(0, "dropout", 0, 1)
