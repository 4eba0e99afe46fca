"""`pneumoscope report` end to end: the files, every section, the same numbers as
`evaluate`, and the page as a real headless Chromium renders it (offline)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.report.evaluate import evaluate_run

SECTIONS = (
    "metrics",
    "confusion",
    "curves",
    "calibration",
    "training",
    "embeddings",
    "gradcam",
    "data-card",
)
FIGURES = ("roc", "pr", "confusion", "reliability", "training", "tsne", "umap", "gradcam_gallery")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(path: Path) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tags


def test_every_section_and_figure(built_report):
    tags = parse(built_report / "index.html")
    ids = {attrs.get("id") for _, attrs in tags}
    assert set(SECTIONS) <= ids
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) == len(FIGURES)
    for name in FIGURES:
        with Image.open(built_report / f"{name}.png") as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 200
    text = (built_report / "index.html").read_text(encoding="utf-8")
    for needle in (
        "95% CI",
        "Expected calibration error",
        "doi:10.17632/rscbjbr9sj",
        "CC BY 4.0",
        "True positives",
        "False negatives",
        "selected epoch",
    ):
        assert needle.lower() in text.lower() or needle in text, needle


def test_self_contained_markup(built_report):
    """Nothing the page would fetch: images inline, no scripts, stylesheets or fonts."""
    tags = parse(built_report / "index.html")
    assert all(
        attrs["src"].startswith("data:image/png;base64,") for tag, attrs in tags if tag == "img"
    )
    assert not [
        tag for tag, attrs in tags if tag in ("script", "link", "iframe", "object", "embed")
    ]
    css = (built_report / "index.html").read_text(encoding="utf-8")
    assert "@import" not in css and "url(" not in css


def test_metrics_are_evaluates(built_report, small_run_copy, report_split, tmp_path):
    # evaluate writes into the run: a copy
    ours = json.loads((built_report / "metrics.json").read_text())
    theirs = evaluate_run(
        small_run_copy, report_split, out=tmp_path / "m.json", n_boot=200, show_progress=False
    )
    for key in (
        "n",
        "threshold",
        "accuracy",
        "sensitivity",
        "specificity",
        "roc_auc",
        "pr_auc",
        "confusion",
        "ci95",
    ):
        assert ours[key] == theirs[key], key
    html = (built_report / "index.html").read_text()
    assert f"{ours['roc_auc']:.3f}" in html and f"{ours['ci95']['roc_auc'][0]:.3f}" in html


def test_embeddings_saved(built_report, report_split):
    emb = np.load(built_report / "embeddings.npy")
    with open(built_report / "embeddings_meta.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = sorted(str(p) for p in report_split.rglob("*.jpeg"))
    # efficientnet_lite0 features
    assert emb.dtype == np.float32 and emb.shape == (
        len(files),
        1280,
    )
    assert sorted(r["path"] for r in rows) == files
    assert [int(r["index"]) for r in rows] == list(range(len(files)))
    assert {r["class"] for r in rows} == {"NORMAL", "PNEUMONIA"}
    coords = np.array(
        [[float(r[k]) for k in ("tsne_x", "tsne_y", "umap_x", "umap_y")] for r in rows]
    )
    assert np.isfinite(coords).all() and coords.std(axis=0).min() > 0
    report = json.loads((built_report / "report.json").read_text())
    assert report["n"] == len(files) and report["timings_s"]["total"] > 0


def test_page_in_headless_chromium(built_report, artifacts_dir, browser):
    requests, errors = [], []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((built_report / "index.html").resolve().as_uri(), wait_until="load")
        widths = page.evaluate(
            "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        page.screenshot(path=str(artifacts_dir / "report.png"), full_page=True)
    finally:
        page.close()
    assert len(widths) == len(FIGURES)
    assert all(complete and width > 0 for _, complete, width in widths), widths
    assert {"metrics", "curves", "training", "embeddings", "gradcam", "data-card"} <= set(sections)
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
    assert not errors, errors
    assert (artifacts_dir / "report.png").stat().st_size > 10_000


def test_cli_report_on_the_runs_validation_part(report_run, tmp_path, capsys):
    out = tmp_path / "val_report"
    assert (
        main(
            [
                "-q",
                "report",
                str(report_run),
                "--split",
                "val",
                "--out",
                str(out),
                "--bootstrap",
                "50",
                "--gradcam-per-group",
                "1",
                "--perplexity",
                "3",
            ]
        )
        == 0
    )
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    with open(report_run / "manifest.csv", newline="") as handle:
        val = sorted(r["path"] for r in csv.DictReader(handle) if r["role"] == "val")
    with open(out / "embeddings_meta.csv", newline="") as handle:
        assert sorted(r["path"] for r in csv.DictReader(handle)) == val
    assert "val part of the run" in (out / "index.html").read_text()
    # the reported part is in the manifest by design: not leakage; no image of it is in train
    assert "val" not in (json.loads((out / "metrics.json").read_text())["leakage"]["shared"] or {})


def test_report_warns_when_the_folder_holds_training_images(
    report_run, report_split, tmp_path, caplog
):
    folder = tmp_path / "leaky"
    shutil.copytree(report_split, folder)
    with open(report_run / "manifest.csv", newline="") as handle:
        trained = next(
            Path(r["path"])
            for r in csv.DictReader(handle)
            if r["role"] == "train" and r["label"] == "0"
        )
    shutil.copy2(trained, folder / "NORMAL" / "renamed_copy.jpeg")  # same bytes under another name
    out = tmp_path / "leaky_report"
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "-q",
                    "report",
                    str(report_run),
                    "--data",
                    str(folder),
                    "--out",
                    str(out),
                    "--bootstrap",
                    "50",
                    "--gradcam-per-group",
                    "1",
                    "--perplexity",
                    "3",
                ]
            )
            == 0
        )
    assert "also in the run's train part" in caplog.text
    shared = json.loads((out / "metrics.json").read_text())["leakage"]["shared"]
    assert shared["train"]["count"] == 1 and "val" not in shared
    assert "Not held out:</b> 1 of these images" in (out / "index.html").read_text()


def test_cli_report_refuses_bad_input(report_run, report_split, tmp_path, capsys):
    with pytest.raises(SystemExit):  # --data and --split exclude each other
        main(["report", str(report_run), "--data", str(report_split), "--split", "val"])
    one_class = tmp_path / "only_normal"
    shutil.copytree(report_split / "NORMAL", one_class / "NORMAL")
    (one_class / "PNEUMONIA").mkdir()
    assert (
        main(
            [
                "-q",
                "report",
                str(report_run),
                "--data",
                str(one_class),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(one_class) in err and "both classes" in err
    assert main(["-q", "report", str(tmp_path), "--split", "val"]) == 2
    assert "not a pneumoscope run directory" in capsys.readouterr().err
