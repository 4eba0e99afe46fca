"""pneumoscope adapt: refusals that leave nothing behind, the cross-validation (patient
folds, one out-of-fold score per film), the site rule on those scores, the record, and a new
run directory the other verbs read while the source run stays byte for byte as it was."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.evaluation.metrics import SENSITIVITY_RULES
from pneumoscope.fsio import file_sha256
from pneumoscope.rundir import ADAPT
from pneumoscope.site.adapt import patient_folds, site_rows
from pneumoscope.site.calibrate import SITE_RULE, site_threshold

FOLDS = 3


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def adapted(base_run, site_sample, tmp_path_factory):
    """(the adapted run, the source run's file hashes before adapt): 3 folds, 1 epoch each."""
    before = _hashes(base_run)
    out = tmp_path_factory.mktemp("adapted") / "new_run"
    assert (
        main(
            [
                "-q",
                "adapt",
                str(base_run),
                "--data",
                str(site_sample),
                "--out",
                str(out),
                "--folds",
                str(FOLDS),
                "--epochs",
                "1",
                "--bootstrap",
                "200",
            ]
        )
        == 0
    )
    return out, before


def _record(run: Path) -> dict:
    return json.loads((run / ADAPT).read_text())


def _small_site(site_sample: Path, dest: Path, normal: int) -> Path:
    for cls, n in (("NORMAL", normal), ("PNEUMONIA", 24)):
        (dest / cls).mkdir(parents=True)
        for f in sorted((site_sample / cls).glob("*.jpeg"))[:n]:
            shutil.copy2(f, dest / cls / f.name)
    return dest


# ----------------------------------------------------------------------------- no training


def test_site_rows_make_the_asked_share_of_an_epoch():
    idx = np.arange(10, 40)
    rows = site_rows(idx, n_train=400, weight=0.2)
    assert len(rows) == 100 and len(rows) / (len(rows) + 400) == pytest.approx(0.2)
    counts = np.bincount(rows)[idx]
    assert counts.min() >= 3 and counts.max() - counts.min() <= 1  # every film about as often
    assert len(site_rows(idx, n_train=40, weight=0.2)) == len(idx)  # never below once each


def test_patient_folds_group_patients_and_stratify():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in rng.integers(0, 40, 120)]
    labels = np.array([int(p[1:]) % 2 for p in patients])  # one class per patient
    fold_of = patient_folds(labels, patients, 5, seed=0)
    assert set(fold_of.tolist()) == set(range(5))
    for p in set(patients):
        assert len({f for q, f in zip(patients, fold_of) if q == p}) == 1
    for k in range(5):
        assert set(labels[fold_of == k]) == {0, 1}


def test_adapt_refuses_a_small_sample_and_writes_nothing(base_run, site_sample, tmp_path, capsys):
    small = _small_site(site_sample, tmp_path / "small", normal=19)
    out = tmp_path / "runs" / "new"
    assert main(["-q", "adapt", str(base_run), "--data", str(small), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        str(small) in err and "NORMAL 19" in err and "PNEUMONIA 24" in err and "at least 20" in err
    )
    assert not (tmp_path / "runs").exists()  # nor the folder it was to go in


def test_adapt_refuses_an_occupied_out(base_run, site_sample, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["-q", "adapt", str(base_run), "--data", str(site_sample), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "holds a run" in err and "--overwrite" in err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
        and (out / "config.json").read_text() == "{}"
    )
    assert (
        main(["-q", "adapt", str(base_run), "--data", str(site_sample), "--out", str(base_run)])
        == 2
    )


def test_adapt_refuses_missing_train_files(base_run, site_sample, tmp_path, capsys):
    """A run whose train images were moved: the error names the manifest and the folder."""
    run = Path(shutil.copytree(base_run, tmp_path / "run"))
    with open(run / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gone = tmp_path / "moved_away"
    for row in rows[::2]:
        row["path"] = str(gone / Path(row["path"]).name)
    with open(run / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "new"
    assert main(["-q", "adapt", str(run), "--data", str(site_sample), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "manifest.csv" in err
        and str(gone) in err
        and f"{len(rows[::2])} of the run's {len(rows)}" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".new*"))


# ----------------------------------------------------------------------------- one adapt


def test_a_killed_adapts_staging_folder_is_removed_by_the_next(tmp_path):
    from pneumoscope.site.adapt import remove_stale_staging

    dead, alive = tmp_path / ".new.adapting-999999999", tmp_path / f".new.adapting-{os.getpid()}"
    for folder in (dead, alive):
        (folder / "folds").mkdir(parents=True)
    remove_stale_staging(tmp_path / "new")
    assert not dead.exists() and alive.exists()  # a running adapt's folder stays


def test_source_run_is_untouched(adapted, base_run):
    out, before = adapted
    assert _hashes(base_run) == before
    assert not list(out.parent.glob(".*adapting*"))  # the staging folder became the run


def test_folds_are_patient_grouped_and_every_film_has_one_oof_score(adapted, site_sample):
    files = _record(adapted[0])["sample"]["files"]
    on_disk = sorted(str(p) for p in site_sample.rglob("*.jpeg"))
    assert sorted(str(Path(f["path"])) for f in files) == on_disk  # each film once
    assert {f["fold"] for f in files} == set(range(1, FOLDS + 1))
    fold_of_patient = {}
    for f in files:
        # never on both sides
        assert fold_of_patient.setdefault(f["patient"], f["fold"]) == f["fold"]
        assert 0.0 <= f["p_adapted_oof"] <= 1.0 and 0.0 <= f["p_source"] <= 1.0


def test_site_threshold_is_the_rule_on_the_recorded_oof_scores(adapted, base_run):
    run = adapted[0]
    record, thresholds = _record(run), json.loads((run / "threshold.json").read_text())
    files = record["sample"]["files"]
    y = np.array([f["label"] == "PNEUMONIA" for f in files], dtype=int)
    oof = np.array([f["p_adapted_oof"] for f in files])
    assert thresholds["default"] == SITE_RULE
    assert thresholds["threshold"] == thresholds["rules"][SITE_RULE] == site_threshold(y, oof, 0.97)
    # the validation rules stay
    assert set(SENSITIVITY_RULES) | {"youden"} <= set(thresholds["rules"])
    cv = record["cross_validation"]
    assert cv["adapted_oof"]["site_threshold"] == thresholds["threshold"]
    source = np.array([f["p_source"] for f in files])
    assert cv["source"]["site_threshold"] == site_threshold(y, source, 0.97)
    from sklearn.metrics import roc_auc_score

    assert cv["adapted_oof"]["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(y, oof))
    assert cv["source"]["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(y, source))
    lo, hi = cv["adapted_oof"]["metrics"]["ci95"]["roc_auc"]
    assert lo <= cv["adapted_oof"]["metrics"]["roc_auc"] <= hi


def test_record_names_source_and_sample_with_sha1(adapted, base_run, site_sample):
    run = adapted[0]
    record = _record(run)
    assert record["source"] == {
        "run": str(base_run.resolve()),
        "model_sha256": file_sha256(base_run / "model_best.safetensors"),
    }
    sample = record["sample"]
    assert sample["data"] == str(site_sample.resolve()) and sample["n"] == {
        "NORMAL": 24,
        "PNEUMONIA": 24,
    }
    assert sample["patients"] == len({f["patient"] for f in sample["files"]})
    for f in sample["files"]:
        assert f["sha1"] == hashlib.sha1(Path(f["path"]).read_bytes()).hexdigest()
        assert Path(f["path"]).parent.name == f["label"]
    assert record["cross_validation"]["folds"] == FOLDS and record["schedule"]["epochs"] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["adapted"]["source_run"] == str(base_run.resolve()) and config["out"] == str(run)
    with open(run / "manifest.csv", newline="") as f:
        train = {r["sha1"] for r in csv.DictReader(f) if r["role"] == "train"}
    assert {f["sha1"] for f in sample["files"]} <= train  # the final model trained on them


def test_adapted_run_is_read_by_evaluate_predict_and_the_card(
    adapted, site_sample, tmp_path, capsys
):
    run = Path(shutil.copytree(adapted[0], tmp_path / "run"))  # evaluate writes into the run
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(run),
                "--data",
                str(site_sample),
                "--out",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["threshold_rule"] == SITE_RULE and metrics["n"] == 48
    # the site films are training data now
    assert metrics["leakage"]["shared"]["train"]["count"] == 48
    film = sorted((site_sample / "NORMAL").glob("*.jpeg"))[0]
    capsys.readouterr()
    assert main(["-q", "predict", str(run), str(film)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[1].split(",")
    assert row[0] == str(film) and row[2] in ("NORMAL", "PNEUMONIA")
    card = (run / "MODEL_CARD.md").read_text()
    record = _record(run)
    assert "## Adaptation to a site" in card and "## Site operating point" in card
    assert f"`{record['sample']['data']}` (24 NORMAL, 24 PNEUMONIA" in card
    assert f"{FOLDS}-fold cross-validation" in card and "not test results" in card
    from pneumoscope.report.build import data_card

    page = data_card(run, json.loads((run / "config.json").read_text()), [], 0, "x")
    assert "Adapted by pneumoscope adapt" in page and record["sample"]["data"] in page


@pytest.mark.slow  # trains and adapts a three-class run
def test_three_class_run_is_adapted_with_the_subtypes_of_the_names(
    three_run, site_folder, tmp_path
):
    """A three-class run: the site films' classes from their names, as train reads them; the
    new run keeps its three classes and both operating points (site, and bacterial vs viral)."""
    out = tmp_path / "three_adapted"
    assert (
        main(
            [
                "-q",
                "adapt",
                str(three_run),
                "--data",
                str(site_folder),
                "--out",
                str(out),
                "--folds",
                "2",
                "--epochs",
                "1",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    config, thresholds = (
        json.loads((out / name).read_text()) for name in ("config.json", "threshold.json")
    )
    assert config["task"] == "three-class" and thresholds["default"] == SITE_RULE
    assert "bacterial_vs_viral" in thresholds
    from pneumoscope.api import load

    rows = load(out).predict(sorted((site_folder / "PNEUMONIA").glob("*.jpeg"))[:2])
    assert {"p_bacterial", "p_viral"} <= set(rows[0])
