"""`pneumoscope drift`: how far an unlabelled folder of images is from the images the
run's model was validated on (RUN_DIR/manifest.csv, role val). No labels are needed.

What is measured (all in drift.json):

* domain_auc — cross-validated ROC AUC of a classifier telling the validation images
  from the folder's by their penultimate-layer embeddings: scikit-learn standardisation
  + logistic regression (L2, class-balanced), stratified 5-fold grouped by patient
  (file-name patient ids), so one patient's films never sit on both sides of a fold.
  0.5: the two sets cannot be told apart; 1.0: every image gives its set away.
* scores — p(pneumonia) of both sets: quantiles, a 10-bin histogram on [0, 1], the share
  predicted positive at the run's threshold.
* outside — the share of the folder outside what validation covered:
  `embedding`: cosine distance of the standardised (validation mean/std) embedding to
  the nearest validation embedding beyond the validation set's own 99th percentile of
  nearest-neighbour distances (each validation image to its nearest image of another
  patient: a new site's film has no sibling film of its patient in validation);
  `score`: p outside [min, max] of the validation scores.
* verdict — from domain_auc (VERDICTS): < 0.60 no detectable shift; < 0.75 moderate
  shift; otherwise strong shift. Cross-validated AUCs of small sets scatter by about
  ±0.05-0.1 around 0.5 when there is no shift, hence the margin of the first cut-off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import Sample, patient_id
from pneumoscope.data.manifest import read_manifest
from pneumoscope.data.sources import expand_paths
from pneumoscope.errors import DataError, MissingFileError
from pneumoscope.fsio import atomic_write_json
from pneumoscope.inference import Predictor
from pneumoscope.report.embeddings import embed_and_predict
from pneumoscope.rundir import DRIFT, MANIFEST

log = logging.getLogger(__name__)

MIN_IMAGES = 20  # per set: 5 folds need a few images of each set in every fold
FOLDS = 5
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HIST_BINS = 10
NN_PERCENTILE = 99.0
# Cosine rather than Euclidean: with far fewer validation images than embedding values,
# Euclidean nearest-neighbour distances of new images run longer than validation's own
# even without any shift (measured: 7-11% of an untouched folder "outside" vs 3-4%).
DISTANCE = "cosine"
# (upper bound of domain_auc, verdict), first match wins
VERDICTS = (
    (0.60, "no detectable shift: the folder looks like the validation images"),
    (
        0.75,
        "moderate shift: check the operating point on a labelled sample (pneumoscope calibrate)",
    ),
    (
        float("inf"),
        "strong shift: validation metrics do not carry over; calibrate on a labelled "
        "sample, and retrain if the shift is large",
    ),
)


def domain_auc(
    reference: np.ndarray, other: np.ndarray, groups: np.ndarray | None = None, seed: int = 0
) -> float:
    """Cross-validated ROC AUC of standardised logistic regression telling `other` (1)
    from `reference` (0): out-of-fold decision values of StratifiedGroupKFold(5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference, other]).astype(np.float64)
    y = np.r_[np.zeros(len(reference), int), np.ones(len(other), int)]
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    model = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)
    )
    folds = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, groups=groups, cv=folds, method="decision_function")
    return float(roc_auc_score(y, scores))


def nearest_distances(reference: np.ndarray, query: np.ndarray, ref_groups=None) -> np.ndarray:
    """Cosine distance of each query row to its nearest reference row. query None:
    each reference row to its nearest reference row of *another patient* (ref_groups),
    since a patient's other films sit close and would make validation look tighter than
    it is for a new patient's film."""
    from sklearn.metrics import pairwise_distances

    if query is not None:
        return pairwise_distances(query, reference, metric=DISTANCE).min(axis=1)
    dist = pairwise_distances(reference, metric=DISTANCE)
    groups = np.asarray(ref_groups) if ref_groups is not None else np.arange(len(reference))
    dist[groups[:, None] == groups[None, :]] = np.inf
    return dist.min(axis=1)


def outside_shares(
    val_emb: np.ndarray, val_p: np.ndarray, val_groups, emb: np.ndarray, p: np.ndarray
) -> dict:
    """The folder's share outside the validation embeddings and scores (module docstring)."""
    mean, std = val_emb.mean(0), val_emb.std(0) + 1e-6
    val_z, z = (val_emb - mean) / std, (emb - mean) / std
    own = nearest_distances(val_z, None, val_groups)
    cut = float(np.percentile(own[np.isfinite(own)], NN_PERCENTILE))
    dist = nearest_distances(val_z, z)
    lo, hi = float(val_p.min()), float(val_p.max())
    return {
        "embedding": float(np.mean(dist > cut)),
        "embedding_cutoff": cut,
        "embedding_definition": (
            f"cosine distance of the standardised embedding to the nearest validation one "
            f"> the {NN_PERCENTILE:g}th percentile of validation nearest-neighbour "
            f"distances (to another patient's image; {cut:.2f})"
        ),
        "score": float(np.mean((p < lo) | (p > hi))),
        "score_range": [lo, hi],
        "score_definition": "p(pneumonia) outside [min, max] of the validation scores",
    }


def score_summary(p: np.ndarray, threshold: float) -> dict:
    counts, edges = np.histogram(p, bins=HIST_BINS, range=(0.0, 1.0))
    return {
        "n": int(len(p)),
        "quantiles": {f"q{round(q * 100):02d}": float(np.quantile(p, q)) for q in QUANTILES},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        "share_positive": float(np.mean(p >= threshold)),
    }


def verdict_for(auc: float) -> str:
    return next(text for bound, text in VERDICTS if auc < bound)


def measure_drift(
    val_emb: np.ndarray,
    val_p: np.ndarray,
    val_groups: np.ndarray,
    emb: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    seed: int = 0,
) -> dict:
    """The drift numbers of a folder (emb, p) against validation (val_emb, val_p)."""
    # Patient ids of the two sets are prefixed so that equal names never join groups.
    all_groups = np.r_[[f"val:{g}" for g in val_groups], [f"new:{g}" for g in groups]]
    auc = domain_auc(val_emb, emb, all_groups, seed=seed)
    return {
        "domain_auc": auc,
        "domain_auc_method": (
            f"scikit-learn StandardScaler + LogisticRegression(class_weight=balanced) on "
            f"penultimate embeddings, out-of-fold decision values of "
            f"StratifiedGroupKFold({FOLDS}) grouped by patient, seed {seed}"
        ),
        "verdict": verdict_for(auc),
        "verdict_cutoffs": {"no_shift_below": VERDICTS[0][0], "moderate_below": VERDICTS[1][0]},
        "threshold": float(threshold),
        "scores": {
            "validation": score_summary(val_p, threshold),
            "folder": score_summary(p, threshold),
        },
        "outside": outside_shares(val_emb, val_p, val_groups, emb, p),
    }


def folder_samples(folder: str | Path) -> list[Sample]:
    """Every image below `folder`, any layout (class folders are read as one set)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such folder")
    # label -1: unknown; drift never reads it
    return [Sample(path=f, label=-1, patient=patient_id(f.name)) for f in expand_paths([folder])]


def validation_samples(run_dir: str | Path) -> list[Sample]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise MissingFileError(
            f"{path}: no manifest; drift compares with the run's validation images"
        )
    roles = read_manifest(path)
    if "val" not in roles:
        raise DataError(f"{path}: no rows with role 'val'; roles: {sorted(roles)}")
    return roles["val"]


def _embed_set(
    predictor: Predictor, samples: list[Sample], name: str, strict: bool, show_progress: bool
) -> tuple[DecodedSet, np.ndarray, np.ndarray]:
    data = decode_samples(
        samples,
        predictor.image_size,
        strict=strict,
        desc=f"decode {name}",
        show_progress=show_progress,
    )
    if len(data.samples) < MIN_IMAGES:
        raise DataError(
            f"{name}: {len(data.samples)} readable images; drift needs at least {MIN_IMAGES}"
        )
    emb, p = embed_and_predict(
        predictor.model, data.images, device=predictor.device, show_progress=show_progress
    )
    return data, emb, p


def compute_drift(
    predictor: Predictor,
    run_dir: str | Path,
    folder: str | Path,
    threshold_rule: str | None = None,
    seed: int = 0,
    strict: bool = False,
    show_progress: bool = True,
) -> dict:
    """Drift of `folder` against the run's validation images, with the predictor given
    (the report passes the one it has loaded)."""
    threshold = predictor.threshold_for(threshold_rule)
    val, val_emb, val_p = _embed_set(
        predictor, validation_samples(run_dir), "validation images", strict, show_progress
    )
    new, emb, p = _embed_set(predictor, folder_samples(folder), str(folder), strict, show_progress)
    result = {
        "run_dir": str(run_dir),
        "data": str(folder),
        "threshold_rule": threshold_rule or predictor.thresholds["default"],
    }
    result.update(
        measure_drift(
            val_emb,
            val_p,
            [s.patient for s in val.samples],
            emb,
            p,
            [s.patient for s in new.samples],
            threshold,
            seed=seed,
        )
    )
    result["unreadable"] = [
        {"path": path, "problem": why} for path, why in val.failures + new.failures
    ]
    return result


def drift_run(
    run_dir: str | Path,
    folder: str | Path,
    out: str | Path | None = None,
    threshold_rule: str | None = None,
    seed: int = 0,
    strict: bool = False,
    show_progress: bool = True,
) -> dict:
    """`pneumoscope drift`: compute_drift with the run's model, written to `out` (JSON)."""
    predictor = Predictor.from_run(run_dir)
    result = compute_drift(predictor, run_dir, folder, threshold_rule, seed, strict, show_progress)
    atomic_write_json(Path(out) if out else Path(run_dir) / DRIFT, result)
    return result


def format_drift(d: dict) -> str:
    """The console table of a drift result."""
    v, f = d["scores"]["validation"], d["scores"]["folder"]
    o = d["outside"]
    rows = [f"{'':<30}{'validation':>12}{'folder':>12}", f"{'images':<30}{v['n']:>12}{f['n']:>12}"]
    for key in ("q05", "q25", "q50", "q75", "q95"):
        rows.append(
            f"{'p(pneumonia) ' + key:<30}{v['quantiles'][key]:>12.3f}{f['quantiles'][key]:>12.3f}"
        )
    rows.append(
        f"{'predicted positive (t=' + format(d['threshold'], '.3f') + ')':<30}"
        f"{v['share_positive']:>12.1%}{f['share_positive']:>12.1%}"
    )
    rows += [
        f"domain AUC (validation vs folder): {d['domain_auc']:.3f}",
        f"outside validation: {o['embedding']:.1%} by embedding distance, {o['score']:.1%} by score",
        f"verdict: {d['verdict']}",
    ]
    return "\n".join(rows)
