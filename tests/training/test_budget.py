"""--recipe auto's time budget (training.budget): views cut first, then epochs, never an
option given; the probe and the record in config.json; a resumed run keeps the cut."""

from __future__ import annotations

import json

import pytest

from pneumoscope.training import TrainConfig, train
from pneumoscope.training.budget import MIN_EPOCHS, estimate_seconds, fit_to_budget
from pneumoscope.training.recipes import RECIPES

CPU_FAST = RECIPES["cpu-fast"]
SMALL = dict(backbone="efficientnet_lite0", image_size=64, batch_size=8, val_fraction=0.25, device="cpu")


def test_estimate_grows_with_views_and_epochs():
    base = estimate_seconds(4000, 800, 2, 8, 0.01, 0.002)
    assert estimate_seconds(4000, 800, 1, 8, 0.01, 0.002) == pytest.approx(base - 4000 * 0.01)
    assert estimate_seconds(4000, 800, 2, 7, 0.01, 0.002) < base


def test_views_go_first_then_epochs_down_to_the_floor():
    # generous budget: nothing cut
    assert fit_to_budget(1000, 200, 2, 8, 1e-4, 1e-5, budget=1e4)[:2] == (2, 8)
    # a budget only views can meet: views cut, epochs kept
    full = estimate_seconds(1000, 200, 2, 8, 0.05, 0.001)
    views, epochs, estimate = fit_to_budget(1000, 200, 2, 8, 0.05, 0.001, budget=full - 60)
    assert (views, epochs) == (0, 8) and estimate <= full - 60
    # an impossible budget: every view and epoch cut to the floor, and the estimate says it misses
    views, epochs, estimate = fit_to_budget(1000, 200, 2, 8, 0.05, 0.05, budget=1.0)
    assert (views, epochs) == (0, MIN_EPOCHS) and estimate > 1.0
    # what the user gave is never cut
    assert fit_to_budget(1000, 200, 2, 8, 0.05, 0.05, budget=1.0, fixed=frozenset({"views"}))[:2] == (2, MIN_EPOCHS)


def test_recipe_filled_names_only_what_the_recipe_set(tmp_path):
    cfg = TrainConfig(data="d", out=str(tmp_path), views=1, device="cpu")
    assert cfg.recipe_requested == "auto" and cfg.recipe == "cpu-fast"
    assert "views" not in cfg.recipe_filled and "epochs" in cfg.recipe_filled


def test_auto_on_a_tiny_budget_cuts_and_records_it_and_resumes(small_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "1")  # no CPU trains anything in a second
    out = tmp_path / "run"
    assert train(TrainConfig(data=str(small_data_root), out=str(out), **SMALL), show_progress=False,
                 stop_after_epochs=1) is None  # an interrupted run
    config = json.loads((out / "config.json").read_text())
    budget = config["budget"]
    assert budget["recipe_values"] == {"views": CPU_FAST["views"], "epochs": CPU_FAST["epochs"]}
    assert budget["chosen"] == {"views": 0, "epochs": MIN_EPOCHS} and not budget["fits"]
    assert (config["views"], config["epochs"]) == (0, MIN_EPOCHS)  # what ran
    assert budget["trunk_ms_per_image"] > 0 and budget["top_ms_per_image"] > 0
    # --resume (another budget now) keeps the cut the run started with
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "100000")
    summary = train(TrainConfig(data=str(small_data_root), out=str(out), **SMALL), resume=True, show_progress=False)
    assert summary["epochs_run"] <= MIN_EPOCHS
    assert json.loads((out / "config.json").read_text())["budget"] == budget


def test_given_options_and_named_recipes_are_never_cut(small_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_TIME_BUDGET", "1")
    out = tmp_path / "given"
    train(TrainConfig(data=str(small_data_root), out=str(out), views=1, epochs=2, **SMALL),
          show_progress=False, stop_after_epochs=1)
    config = json.loads((out / "config.json").read_text())
    assert "budget" not in config and (config["views"], config["epochs"]) == (1, 2)
    named = tmp_path / "named"
    train(TrainConfig(data=str(small_data_root), out=str(named), recipe="cpu-fast", **SMALL),
          show_progress=False, stop_after_epochs=1)
    config = json.loads((named / "config.json").read_text())
    assert "budget" not in config and config["views"] == CPU_FAST["views"]
