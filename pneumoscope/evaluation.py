"""Metrics, bootstrap confidence intervals and threshold rules (numpy in, dict out)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def threshold_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Metrics that depend on the decision threshold (label = p >= threshold)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    sensitivity = _safe_div(tp, tp + fn)
    precision = _safe_div(tp, tp + fp)
    return {
        "accuracy": _safe_div(tp + tn, len(y_true)),
        "sensitivity": sensitivity,
        "specificity": _safe_div(tn, tn + fp),
        "precision": precision,
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


def ranking_metrics(y_true: np.ndarray, p: np.ndarray) -> dict:
    """Threshold-free metrics; NaN when only one class is present."""
    if len(np.unique(y_true)) < 2:
        return {"roc_auc": float("nan"), "pr_auc": float("nan")}
    return {
        "roc_auc": float(roc_auc_score(y_true, p)),
        "pr_auc": float(average_precision_score(y_true, p)),
    }


def _point_metrics(y_true, p, threshold) -> dict:
    out = threshold_metrics(y_true, p, threshold)
    out.update(ranking_metrics(y_true, p))
    return out


def bootstrap_ci(
    y_true: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Percentile 95% intervals over resamples of the images, stratified by class so every
    resample keeps both classes (and its AUC is defined)."""
    rng = np.random.default_rng(seed)
    y_true, p = np.asarray(y_true).astype(int), np.asarray(p, dtype=float)
    by_class = [np.flatnonzero(y_true == c) for c in (0, 1)]
    draws = {k: [] for k in CI_METRICS}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, size=len(ix), replace=True) for ix in by_class if len(ix)])
        m = _point_metrics(y_true[idx], p[idx], threshold)
        for k in CI_METRICS:
            draws[k].append(m[k])
    return {
        k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        for k, v in draws.items()
    }


def evaluate_predictions(
    y_true: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict:
    """The metrics.json content: point estimates at `threshold` plus bootstrap CIs."""
    y_true = np.asarray(y_true).astype(int)
    out = {"n": int(len(y_true)), "threshold": float(threshold)}
    out.update(_point_metrics(y_true, p, threshold))
    out["ci95"] = bootstrap_ci(y_true, p, threshold, n_boot=n_boot, seed=seed) if n_boot else {}
    return out


def youden_threshold(y_true: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on (y_true, p)."""
    fpr, tpr, thresholds = roc_curve(y_true, p)
    finite = np.isfinite(thresholds)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))])


def sensitivity_threshold(y_true: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """Highest threshold whose sensitivity on (y_true, p) reaches `target`."""
    fpr, tpr, thresholds = roc_curve(y_true, p)
    ok = np.flatnonzero((tpr >= target) & np.isfinite(thresholds))
    return float(thresholds[ok[0]])  # roc_curve lists thresholds in decreasing order


DEFAULT_THRESHOLD_RULE = "youden"


def choose_thresholds(y_true: np.ndarray, p: np.ndarray) -> dict:
    """The operating thresholds chosen on validation; `default` names the rule used by
    evaluate/predict/serve unless told otherwise."""
    rules = {
        "youden": youden_threshold(y_true, p),
        "sensitivity95": sensitivity_threshold(y_true, p, 0.95),
    }
    return {"rules": rules, "default": DEFAULT_THRESHOLD_RULE, "threshold": rules[DEFAULT_THRESHOLD_RULE]}


def format_metrics(m: dict) -> str:
    """A short console table of evaluate_predictions' output."""
    ci = m.get("ci95", {})
    lines = [f"n={m['n']}  threshold={m['threshold']:.4f}", f"{'metric':<12}{'value':>8}   95% CI"]
    for key in CI_METRICS:
        lo_hi = ci.get(key)
        span = f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""
        lines.append(f"{key:<12}{m[key]:>8.4f}   {span}")
    c = m["confusion"]
    lines.append(f"confusion    tp={c['tp']} fp={c['fp']} tn={c['tn']} fn={c['fn']}")
    return "\n".join(lines)
