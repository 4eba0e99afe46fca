"""Binary metrics, their patient-bootstrap intervals and the threshold rules' thresholds
(numpy in, dict out)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from pneumoscope.evaluation.bootstrap import patient_bootstrap
from pneumoscope.evaluation.threshold_rules import DEFAULT_THRESHOLD_RULE, SENSITIVITY_RULES

CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")


def safe_div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def threshold_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Metrics that depend on the decision threshold (label = p >= threshold)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    return {
        **rates(tp, fp, tn, fn),
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


def rates(tp, fp, tn, fn) -> dict:
    return {
        "accuracy": safe_div(tp + tn, tp + fp + tn + fn),
        "sensitivity": safe_div(tp, tp + fn),
        "specificity": safe_div(tn, tn + fp),
        "precision": safe_div(tp, tp + fp),
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
    }


def ranking_metrics(y_true: np.ndarray, p: np.ndarray) -> dict:
    """Threshold-free metrics; NaN when only one class is present."""
    if len(np.unique(y_true)) < 2:
        return {"roc_auc": float("nan"), "pr_auc": float("nan")}
    return {
        "roc_auc": float(roc_auc_score(y_true, p)),
        "pr_auc": float(average_precision_score(y_true, p)),
    }


def binary_point_metrics(y_true, p, threshold) -> dict:
    out = threshold_metrics(y_true, p, threshold)
    out.update(ranking_metrics(y_true, p))
    return out


def resample_metrics(y_true: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """CI_METRICS of one bootstrap resample: binary_point_metrics' numbers by sklearn's own
    formulas (_binary_clf_curve, trapezoidal ROC AUC, step-wise average precision) in plain
    numpy, since sklearn's per-call input checks cost ~30 ms a call: 1000 resamples took
    ~40 s on a 2-core VM, in every train (model card), evaluate and report.
    y_true: 0/1 ints; p: floats. tests/test_evaluation.py checks it against sklearn."""
    pred = p >= threshold
    pos = y_true == 1
    tp, fp = int(np.count_nonzero(pred & pos)), int(np.count_nonzero(pred & ~pos))
    n_pos = int(np.count_nonzero(pos))
    out = rates(tp, fp, len(y_true) - n_pos - fp, n_pos - tp)
    if n_pos in (0, len(y_true)):
        return {**out, "roc_auc": float("nan"), "pr_auc": float("nan")}
    order = np.argsort(p, kind="mergesort")[::-1]  # sklearn's order: descending score
    score, y = p[order], y_true[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]  # the end of each distinct score
    tps = np.cumsum(y)[last].astype(float)
    fps = 1 + last - tps
    tpr, fpr = np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]
    roc_auc = (
        np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0
    ).sum()  # the trapezoid rule, as sklearn's auc
    pr_auc = np.sum(np.diff(np.r_[0, tps / tps[-1]]) * (tps / (tps + fps)))
    return {**out, "roc_auc": float(roc_auc), "pr_auc": float(pr_auc)}


CI_METHOD = (
    "percentile 95% intervals of a patient-level (cluster) bootstrap: patients are drawn with "
    "replacement and bring all their images; stratified by the patient's class (a patient "
    "with any pneumonia image counts as pneumonia), so every resample keeps both classes"
)


def bootstrap_ci(
    y_true: np.ndarray,
    p: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    patients=None,
    score=None,
) -> dict:
    """Percentile 95% intervals of CI_METRICS over resamples of the patients (CI_METHOD,
    evaluation.bootstrap). patients: one id per image (None: each image its own patient);
    score: what scores a resample (default the numpy resample_metrics;
    benchmarks/bootstrap_bench.py passes scikit-learn's binary_point_metrics to compare)."""
    score = resample_metrics if score is None else score
    y_true, p = np.asarray(y_true).astype(int), np.asarray(p, dtype=float)

    def scored(idx: np.ndarray) -> dict:
        m = score(y_true[idx], p[idx], threshold)
        return {k: m[k] for k in CI_METRICS}

    return patient_bootstrap(y_true, patients, scored, n_boot=n_boot, seed=seed)


def evaluate_predictions(
    y_true: np.ndarray,
    p: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    patients=None,
) -> dict:
    """The metrics.json content: point estimates at `threshold` plus patient-bootstrap CIs."""
    y_true = np.asarray(y_true).astype(int)
    out = {"n": int(len(y_true)), "threshold": float(threshold)}
    if patients is not None:
        out["n_patients"] = int(len(set(map(str, patients))))
    out.update(binary_point_metrics(y_true, p, threshold))
    if n_boot:
        out["ci95"] = bootstrap_ci(
            y_true, p, threshold, n_boot=n_boot, seed=seed, patients=patients
        )
        out["ci_method"] = (
            CI_METHOD
            + f"; {n_boot} resamples"
            + (
                ""
                if patients is not None
                else "; no patient ids were given, so each image was its own patient"
            )
        )
    else:
        out["ci95"] = {}
    return out


def youden_threshold(y_true: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on (y_true, p)."""
    fpr, tpr, thresholds = roc_curve(y_true, p)
    finite = np.isfinite(thresholds)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))])


def sensitivity_threshold(y_true: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """Highest threshold whose sensitivity on (y_true, p) reaches `target`."""
    # drop_intermediate=False: the default drops the points inside a vertical run of the
    # curve, so the first point reaching the target would be the bottom of that run (a
    # lower threshold, more false positives) rather than the highest threshold that reaches it.
    fpr, tpr, thresholds = roc_curve(y_true, p, drop_intermediate=False)
    ok = np.flatnonzero((tpr >= target) & np.isfinite(thresholds))
    return float(thresholds[ok[0]])  # roc_curve lists thresholds in decreasing order


def choose_thresholds(y_true: np.ndarray, p: np.ndarray) -> dict:
    """The operating thresholds chosen on validation; `default` names the rule used by
    evaluate/predict/serve unless told otherwise."""
    rules = {"youden": youden_threshold(y_true, p)}
    rules.update(
        {
            name: sensitivity_threshold(y_true, p, target)
            for name, target in SENSITIVITY_RULES.items()
        }
    )
    return {
        "rules": rules,
        "default": DEFAULT_THRESHOLD_RULE,
        "threshold": rules[DEFAULT_THRESHOLD_RULE],
    }


def format_metrics(m: dict) -> str:
    """A short console table of evaluate_predictions' output."""
    ci = m.get("ci95", {})
    patients = f"  patients={m['n_patients']}" if "n_patients" in m else ""
    lines = [
        f"n={m['n']}{patients}  threshold={m['threshold']:.4f}",
        f"{'metric':<12}{'value':>8}   95% CI (patients resampled)",
    ]
    for key in CI_METRICS:
        lo_hi = ci.get(key)
        span = f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""
        lines.append(f"{key:<12}{m[key]:>8.4f}   {span}")
    c = m["confusion"]
    lines.append(f"confusion    tp={c['tp']} fp={c['fp']} tn={c['tn']} fn={c['fn']}")
    return "\n".join(lines)
