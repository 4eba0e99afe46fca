"""`pneumoscope calibrate`: re-choose the operating point on a small labelled sample of a
new site, and make it the run's default rule `site`.

The site rule: the highest threshold t (one of the sample's own scores) whose
sensitivity on the site sample, mean(p >= t | PNEUMONIA), reaches the target (default
0.97). Any higher threshold misses the target; among the thresholds that reach it, the
highest labels the fewest NORMAL films positive, so specificity is as high as it can be
at that sensitivity on this sample.

threshold.json keeps its old rules (youden, sensitivity95 chosen on validation), gains
`rules.site`, `default: "site"`, `threshold` = the site threshold, and a `site` block
recording the sample (folder, date, n per class, each file's path, sha1, label,
patient) and the sample's metrics at the site threshold and at the previous default,
with bootstrap 95% intervals. Re-running calibrate replaces the site rule.

The metrics are measured on the very sample the threshold was chosen on, so they are
optimistic for that site (the sensitivity most of all: the threshold was put where the
target is just met). They say whether the sample supports the rule, not how it will do.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.data.manifest import read_manifest
from pneumoscope.errors import DataError, OptionError
from pneumoscope.evaluation.metrics import evaluate_predictions, sensitivity_threshold
from pneumoscope.fsio import atomic_write_json
from pneumoscope.report.model_card import update_model_card
from pneumoscope.rundir import MANIFEST, THRESHOLD, RunDir
from pneumoscope.tasks import CLASSES

log = logging.getLogger(__name__)

SITE_RULE = "site"
DEFAULT_TARGET_SENSITIVITY = 0.97
MIN_PER_CLASS = 20  # below this a sample says nothing (1/20 = 5% per image)
ADVISED_PER_CLASS = 40
OPTIMISM_NOTE = (
    "the metrics are measured on the same sample the threshold was chosen on, so "
    "they are optimistic for this site (sensitivity most of all)"
)


class SampleTooSmallError(DataError):
    """A site sample with fewer than MIN_PER_CLASS readable images of a class."""


def site_threshold(y_true: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (label = p >= t) on the site sample reaches
    `target`: the validation rule sensitivity95's, with the site's target."""
    if not np.any(np.asarray(y_true) == 1):
        raise DataError("site threshold: the sample has no PNEUMONIA image")
    return sensitivity_threshold(y_true, p, target)


def check_sample_size(labels: np.ndarray, data_name: str) -> None:
    counts = np.bincount(labels, minlength=len(CLASSES))
    small = [f"{c} {n}" for c, n in zip(CLASSES, counts) if n < MIN_PER_CLASS]
    if small:
        raise SampleTooSmallError(
            f"{data_name}: too small a site sample to choose a threshold on: readable images "
            + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts))
            + f"; label at least {MIN_PER_CLASS} per class ({ADVISED_PER_CLASS}-100 advised)"
        )
    if counts.min() < ADVISED_PER_CLASS:
        log.warning(
            "%s: %d images of a class only; %d-100 per class are advised (the intervals "
            "will be wide)",
            data_name,
            counts.min(),
            ADVISED_PER_CLASS,
        )


def read_site_sample(
    site_dir: str | Path, image_size: int, strict: bool = False, show_progress: bool = True
) -> DecodedSet:
    """SITE_DIR/{NORMAL,PNEUMONIA} decoded at the run's size; SampleTooSmallError below
    MIN_PER_CLASS readable films of a class (before any model work)."""
    data = decode_samples(
        discover_split(site_dir),
        image_size,
        strict=strict,
        desc="decode site",
        show_progress=show_progress,
    )
    check_sample_size(data.labels, str(site_dir))
    return data


def sample_record(site_dir: str | Path, data: DecodedSet, run_dir: str | Path) -> dict:
    """What threshold.json (and adapt.json) record of a site sample: folder, n per class,
    patients, unreadable files, and each file's path, sha1, label and patient."""
    patients = [s.patient for s in data.samples]
    return {
        "data": str(Path(site_dir).resolve()),
        "n": {c: int(n) for c, n in zip(CLASSES, np.bincount(data.labels, minlength=len(CLASSES)))},
        "patients": len(set(patients)),
        "patients_seen_by_run": _patients_seen(run_dir, patients),
        "unreadable": [{"path": p, "problem": why} for p, why in data.failures],
        "files": [
            {"path": str(s.path), "sha1": key, "label": CLASSES[s.label], "patient": s.patient}
            for s, key in zip(data.samples, data.keys)
        ],
    }


def site_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    patients: list[str],
    n_boot: int,
    seed: int = 0,
) -> dict:
    """evaluate_predictions at `threshold`, the intervals resampling patients."""
    metrics = evaluate_predictions(
        labels, probs, threshold, n_boot=n_boot, seed=seed, patients=patients
    )
    return metrics


def calibrate_run(
    run_dir: str | Path,
    site_dir: str | Path,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    n_boot: int = 1000,
    strict: bool = False,
    show_progress: bool = True,
) -> dict:
    """Choose the site threshold on SITE_DIR/{NORMAL,PNEUMONIA}, write it into the run's
    threshold.json as the default rule `site`, and return the `site` block written."""
    if not 0.0 < target_sensitivity <= 1.0:
        raise OptionError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    from pneumoscope.deploy.scoring import load_scorer

    run = RunDir(run_dir)
    # the engine evaluate, predict and serve score with: the threshold is one of the sample's
    # own scores, so another engine's last-digit difference could put that film below it
    predictor = load_scorer(run_dir)
    data = read_site_sample(site_dir, predictor.image_size, strict, show_progress)
    labels = data.labels
    probs = predictor.predict_images(data.images, show_progress=show_progress)
    patients = [s.patient for s in data.samples]

    thresholds = run.read_threshold()
    previous_rule = _previous_default(thresholds)
    threshold = site_threshold(labels, probs, target_sensitivity)
    site = {
        "rule": (
            f"highest threshold whose sensitivity on the site sample reaches "
            f"{target_sensitivity:g} (label = PNEUMONIA if p >= threshold)"
        ),
        "target_sensitivity": target_sensitivity,
        "threshold": threshold,
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sample": sample_record(site_dir, data, run_dir),
        "metrics": site_metrics(labels, probs, threshold, patients, n_boot),
        "previous_default": {
            "rule": previous_rule,
            "threshold": float(thresholds["rules"][previous_rule]),
            "metrics_on_sample": site_metrics(
                labels, probs, float(thresholds["rules"][previous_rule]), patients, n_boot
            ),
        },
        "note": OPTIMISM_NOTE,
    }
    thresholds["rules"][SITE_RULE] = threshold
    thresholds.update(default=SITE_RULE, threshold=threshold, site=site)
    atomic_write_json(run / THRESHOLD, thresholds)
    _refresh_exports(run_dir, thresholds)
    update_model_card(run_dir)  # the card names the site rule
    return site


def _patients_seen(run_dir: str | Path, patients: list[str]) -> int:
    """How many of the sample's patient ids (from Kermany-style file names) the run trained
    or validated on (manifest.csv); warns, since such films are not a new site's."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return 0
    seen = {s.patient for samples in read_manifest(path).values() for s in samples}
    shared = sorted(set(patients) & seen)
    if shared:
        log.warning(
            "%d patient(s) of the site sample are in the run's train/val split (%s%s): "
            "their films are not new to the model",
            len(shared),
            ", ".join(shared[:5]),
            ", ..." if len(shared) > 5 else "",
        )
    return len(shared)


def _previous_default(thresholds: dict) -> str:
    """The rule calibrate replaces as the default: the run's own default, or, when an
    earlier calibrate made `site` the default, the one that one replaced."""
    if thresholds.get("default") != SITE_RULE:
        return thresholds["default"]
    return thresholds.get("site", {}).get("previous_default", {}).get("rule", "youden")


def _refresh_exports(run_dir: str | Path, thresholds: dict) -> None:
    """ONNX exports inside the run carry the thresholds in their contract: update them.
    (Exports elsewhere are corrected at load time: OnnxPredictor with a run_dir takes the
    run's threshold.json and warns that the contract is stale.)"""
    from pneumoscope.deploy.onnx_contract import contract_path, refresh_contract_thresholds

    for onnx in sorted(Path(run_dir).glob("*.onnx")):
        if contract_path(onnx).exists():
            refresh_contract_thresholds(onnx, thresholds)


def format_site(site: dict) -> str:
    """The console summary of calibrate: the rule, the sample, the metrics with intervals."""
    from pneumoscope.evaluation.metrics import format_metrics

    n = site["sample"]["n"]
    prev = site["previous_default"]
    pm = prev["metrics_on_sample"]
    return "\n".join(
        [
            f"site rule: {site['rule']}",
            f"sample: {site['sample']['data']}  "
            + ", ".join(f"{c} {k}" for c, k in n.items())
            + f"  ({site['sample']['patients']} patients)",
            format_metrics(site["metrics"]),
            f"intervals: {site['metrics'].get('ci_method', 'none (no resamples)')}",
            f"previous default {prev['rule']} (threshold {prev['threshold']:.4f}) on this sample: "
            f"sensitivity {pm['sensitivity']:.3f}, specificity {pm['specificity']:.3f}",
            f"warning: {site['note']}",
        ]
    )
