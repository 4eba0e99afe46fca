"""--recipe auto's time budget (training.budget): views cut first, then epochs, never an
option given; the probe and the record in config.json; a resumed run keeps the cut."""

from __future__ import annotations

import json

import pytest

from pneumoscope.training import TrainConfig, fit
from pneumoscope.training.budget import MIN_EPOCHS, MIN_VIEWS, estimate_seconds, fit_to_budget
from pneumoscope.training.recipes import RECIPES

CPU_FAST = RECIPES["cpu-fast"]
SMALL = dict(backbone="efficientnet_lite0", batch_size=8, val_fraction=0.25, device="cpu")


def test_estimate_grows_with_views_and_epochs():
    base = estimate_seconds(4000, 800, 2, 8, 0.01, 0.002)
    assert estimate_seconds(4000, 800, 1, 8, 0.01, 0.002) == pytest.approx(base - 4000 * 0.01)
    assert estimate_seconds(4000, 800, 2, 7, 0.01, 0.002) < base


def _cut(chosen: dict) -> tuple:
    return chosen["image_size"], chosen["views"], chosen["epochs"]


def test_size_goes_first_then_views_then_epochs_down_to_the_floors():
    # generous budget: nothing cut
    assert _cut(fit_to_budget(1000, 200, 2, 8, 1e-4, 1e-5, budget=1e4, image_size=128)) == (
        128,
        2,
        8,
    )
    # a budget the smaller input alone meets: only the size cut, the estimate scaled by the pixels
    full = estimate_seconds(1000, 200, 2, 8, 0.05, 0.001)
    small = estimate_seconds(1000, 200, 2, 8, 0.05 * (96 / 128) ** 2, 0.001 * (96 / 128) ** 2)
    chosen = fit_to_budget(1000, 200, 2, 8, 0.05, 0.001, budget=(full + small) / 2, image_size=128)
    assert _cut(chosen) == (96, 2, 8) and chosen["estimate"] == pytest.approx(small)
    # an impossible budget: every cut to its floor (one view kept), and the estimate says it misses
    chosen = fit_to_budget(1000, 200, 2, 8, 0.05, 0.05, budget=1.0, image_size=128)
    assert _cut(chosen) == (96, MIN_VIEWS, MIN_EPOCHS) and chosen["estimate"] > 1.0
    # what the user gave is never cut
    chosen = fit_to_budget(
        1000,
        200,
        2,
        8,
        0.05,
        0.05,
        budget=1.0,
        image_size=128,
        fixed=frozenset({"views", "image_size"}),
    )
    assert _cut(chosen) == (128, 2, MIN_EPOCHS)


def test_recipe_filled_names_only_what_the_recipe_set(tmp_path):
    cfg = TrainConfig(data="d", out=str(tmp_path), views=1, device="cpu")
    assert cfg.recipe_requested == "auto" and cfg.recipe == "cpu-fast"
    assert "views" not in cfg.recipe_filled and "epochs" in cfg.recipe_filled


@pytest.mark.slow  # trains and resumes
def test_auto_on_a_tiny_budget_cuts_and_records_it_and_resumes(
    small_data_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "1")  # no CPU trains anything in a second
    out = tmp_path / "run"
    # an interrupted run
    assert (
        fit(
            TrainConfig(data=str(small_data_root), out=str(out), **SMALL),
            show_progress=False,
            stop_after_epochs=1,
        )
        is None
    )
    config = json.loads((out / "config.json").read_text())
    budget = config["budget"]
    assert budget["recipe_values"] == {
        name: CPU_FAST[name] for name in ("image_size", "views", "epochs")
    }
    assert (
        budget["chosen"] == {"image_size": 96, "views": MIN_VIEWS, "epochs": MIN_EPOCHS}
        and not budget["fits"]
    )
    # what ran
    assert (config["image_size"], config["views"], config["epochs"]) == (
        96,
        MIN_VIEWS,
        MIN_EPOCHS,
    )
    assert (
        budget["trunk_ms_per_image"] > 0
        and budget["top_ms_per_image"] > 0
        and budget["probe_seconds"] > 0
    )
    # --resume (another budget now) keeps the cut the run started with
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "100000")
    summary = fit(
        TrainConfig(data=str(small_data_root), out=str(out), **SMALL),
        resume=True,
        show_progress=False,
    )
    assert summary["epochs_run"] <= MIN_EPOCHS and summary["budget"] == budget
    assert json.loads((out / "config.json").read_text())["budget"] == budget


def test_given_options_and_named_recipes_are_never_cut(small_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "1")
    out = tmp_path / "given"
    fit(
        TrainConfig(
            data=str(small_data_root), out=str(out), views=1, epochs=2, image_size=64, **SMALL
        ),
        show_progress=False,
        stop_after_epochs=1,
    )
    config = json.loads((out / "config.json").read_text())
    assert "budget" not in config and (config["views"], config["epochs"], config["image_size"]) == (
        1,
        2,
        64,
    )
    named = tmp_path / "named"
    fit(
        TrainConfig(
            data=str(small_data_root), out=str(named), recipe="cpu-fast", image_size=64, **SMALL
        ),
        show_progress=False,
        stop_after_epochs=1,
    )
    config = json.loads((named / "config.json").read_text())
    assert "budget" not in config and config["views"] == CPU_FAST["views"]


def test_the_probe_leaves_the_model_as_it_was(small_data_root, tmp_path):
    """--recipe auto with nothing cut trains the same model as --recipe cpu-fast: the probe's
    steps run on a copy (BatchNorm statistics and weights untouched)."""
    import torch

    from pneumoscope.models import build_model
    from pneumoscope.training.budget import probe

    cfg = TrainConfig(data=str(small_data_root), out=str(tmp_path), image_size=64, **SMALL)
    model = build_model("efficientnet_lite0", weights="imagenet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trunk_s, top_s = probe(cfg, model, torch.device("cpu"))
    assert trunk_s > 0 and top_s > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
