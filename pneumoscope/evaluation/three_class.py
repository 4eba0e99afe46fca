"""metrics.json of a three-class run (NORMAL / BACTERIAL / VIRAL), with patient-level
bootstrap intervals (the cluster bootstrap of evaluation.bootstrap: patients drawn, stratified
by their class, normal / bacterial / viral, each bringing all of their films; each
resample scored in numpy, as evaluation.metrics.resample_metrics does for binary runs).

Layout: task, n, n_patients, thresholds, accuracy, macro_roc_auc, per_class (one-vs-rest
sensitivity, specificity, precision, f1, roc_auc for normal, bacterial, viral), confusion
(3x3, rows true, columns predicted), ci95 (the same keys), a `binary` block (the binary
metrics.json on p(pneumonia) at the binary threshold) and a `bacterial_vs_viral` block (on
the pneumonia films, bacterial = positive, at the bacterial/viral threshold).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from pneumoscope.evaluation.bootstrap import patient_bootstrap
from pneumoscope.evaluation.metrics import evaluate_predictions, rates, resample_metrics, safe_div
from pneumoscope.tasks import (
    CLASS_NAMES,
    KEYS,
    THREE_CLASS,
    p_bacterial_given_pneumonia,
    p_pneumonia,
    predicted_classes,
)

PER_CLASS_METRICS = ("sensitivity", "specificity", "precision", "f1", "roc_auc")
BV_KEYS = (
    "n",
    "n_patients",
    "threshold",
    "roc_auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "ci95",
)
CI_METHOD = (
    "percentile 95% intervals of a patient-level (cluster) bootstrap: patients are drawn with "
    "replacement and bring all their images; stratified by the patient's class, normal, bacterial "
    "or viral (a patient with films of several classes counts as viral if any film is, else "
    "bacterial if any is), so every resample keeps all three classes"
)
BV_CI_METHOD = (
    "percentile 95% intervals of a patient-level (cluster) bootstrap over the pneumonia patients: "
    "drawn with replacement, each bringing all their pneumonia films; stratified bacterial / viral "
    "(a patient with any bacterial film counts as bacterial), so every resample keeps both subtypes"
)


def _ovr_auc(y: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def point_metrics(y: np.ndarray, probs: np.ndarray, threshold: float, bv_threshold: float) -> dict:
    """Accuracy, macro one-vs-rest ROC AUC, per-class one-vs-rest metrics, 3x3 confusion
    (labels by the hierarchical rule of pneumoscope.tasks)."""
    y = np.asarray(y).astype(int)
    pred = predicted_classes(probs, threshold, bv_threshold)
    cm = confusion_matrix(y, pred, labels=[0, 1, 2])
    per_class = {}
    for c, key in enumerate(KEYS):
        tp = cm[c, c]
        fn, fp = cm[c].sum() - tp, cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        per_class[key] = {
            "sensitivity": safe_div(tp, tp + fn),
            "specificity": safe_div(tn, tn + fp),
            "precision": safe_div(tp, tp + fp),
            "f1": safe_div(2 * tp, 2 * tp + fp + fn),
            "roc_auc": _ovr_auc((y == c).astype(int), np.asarray(probs)[:, c]),
        }
    # The unweighted mean of the one-vs-rest AUCs: scikit-learn's multi_class="ovr", "macro".
    return {
        "accuracy": safe_div((pred == y).sum(), len(y)),
        "macro_roc_auc": float(np.mean([per_class[k]["roc_auc"] for k in KEYS])),
        "per_class": per_class,
        "confusion": {
            "labels": list(CLASS_NAMES[THREE_CLASS]),
            "rows": "true",
            "columns": "predicted",
            "matrix": cm.tolist(),
        },
    }


def _flat(m: dict) -> dict:
    out = {"accuracy": m["accuracy"], "macro_roc_auc": m["macro_roc_auc"]}
    out.update({(k, name): m["per_class"][k][name] for k in KEYS for name in PER_CLASS_METRICS})
    return out


def _resample_flat(y: np.ndarray, pred: np.ndarray, probs: np.ndarray) -> dict:
    """_flat(point_metrics(...)) of one resample in numpy (scikit-learn's per-call checks
    made 1000 resamples take tens of seconds): y, pred: class indices; probs: (N, 3)."""
    cm = np.bincount(y * 3 + pred, minlength=9).reshape(3, 3)
    out: dict = {"accuracy": safe_div(np.trace(cm), len(y))}
    for c, key in enumerate(KEYS):
        tp = cm[c, c]
        fn, fp = cm[c].sum() - tp, cm[:, c].sum() - tp
        counts = rates(tp, fp, cm.sum() - tp - fn - fp, fn)
        counts["roc_auc"] = resample_metrics((y == c).astype(int), probs[:, c], 0.5)["roc_auc"]
        out.update({(key, name): counts[name] for name in PER_CLASS_METRICS})
    out["macro_roc_auc"] = float(np.mean([out[(k, "roc_auc")] for k in KEYS]))
    return out


def three_class_ci(
    y, probs, threshold, bv_threshold, patients=None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Percentile 95% intervals of the point metrics over patient resamples (CI_METHOD,
    evaluation.bootstrap: the binary intervals' draws)."""
    y, probs = np.asarray(y).astype(int), np.asarray(probs, dtype=np.float64)
    # per image: a resample only picks rows
    pred = predicted_classes(probs, threshold, bv_threshold)
    span = patient_bootstrap(
        y,
        patients,
        lambda idx: _resample_flat(y[idx], pred[idx], probs[idx]),
        n_boot=n_boot,
        seed=seed,
    )
    return {
        "accuracy": span["accuracy"],
        "macro_roc_auc": span["macro_roc_auc"],
        "per_class": {k: {name: span[(k, name)] for name in PER_CLASS_METRICS} for k in KEYS},
    }


def evaluate_three_class(
    y,
    probs,
    threshold: float,
    bv_threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    patients=None,
) -> dict:
    """The three-class metrics.json content (module docstring); y: 0 normal, 1 bacterial, 2 viral."""
    y, probs = np.asarray(y).astype(int), np.asarray(probs, dtype=np.float64)
    pats = np.asarray(patients, dtype=str) if patients is not None else None
    out = {"task": THREE_CLASS, "n": int(len(y))}
    if pats is not None:
        out["n_patients"] = int(len(set(pats)))
    out.update(threshold=float(threshold), bacterial_vs_viral_threshold=float(bv_threshold))
    out.update(point_metrics(y, probs, threshold, bv_threshold))
    if n_boot:
        out["ci95"] = three_class_ci(
            y, probs, threshold, bv_threshold, pats, n_boot=n_boot, seed=seed
        )
        out["ci_method"] = (
            CI_METHOD
            + f"; {n_boot} resamples"
            + (
                ""
                if pats is not None
                else "; no patient ids were given, so each image was its own patient"
            )
        )
    else:
        out["ci95"] = {}
    out["binary"] = evaluate_predictions(
        (y > 0).astype(int),
        p_pneumonia(probs),
        threshold,
        n_boot=n_boot,
        seed=seed,
        patients=patients,
    )
    out["bacterial_vs_viral"] = bacterial_vs_viral(y, probs, bv_threshold, pats, n_boot, seed)
    return out


def bacterial_vs_viral(y, probs, bv_threshold, patients, n_boot: int, seed: int) -> dict:
    """p(bacterial | pneumonia) on the pneumonia films (true label), bacterial = positive."""
    films = y > 0
    block = evaluate_predictions(
        (y[films] == 1).astype(int),
        p_bacterial_given_pneumonia(probs[films]),
        bv_threshold,
        n_boot=n_boot,
        seed=seed,
        patients=None if patients is None else patients[films],
    )
    kept = {k: block[k] for k in BV_KEYS if k in block}
    kept["ci95"] = {
        k: v
        for k, v in block.get("ci95", {}).items()
        if k in ("roc_auc", "accuracy", "sensitivity", "specificity")
    }
    if n_boot:
        kept["ci_method"] = (
            BV_CI_METHOD
            + f"; {n_boot} resamples"
            + (
                ""
                if patients is not None
                else "; no patient ids were given, so each image was its own patient"
            )
        )
    kept.update(
        positive="bacterial",
        films="true pneumonia films (bacterial or viral)",
        score="p(bacterial | pneumonia) = p_bacterial / (p_bacterial + p_viral)",
    )
    return kept


def format_three_class(m: dict) -> str:
    """A short console table of evaluate_three_class's output."""
    ci = m.get("ci95", {})

    def span(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    lines = [
        f"n={m['n']}  patients={m.get('n_patients', '-')}  threshold={m['threshold']:.4f}  "
        f"bacterial/viral threshold={m['bacterial_vs_viral_threshold']:.4f}",
        f"accuracy      {m['accuracy']:.4f}   {span(ci.get('accuracy'))}",
        f"macro ROC AUC {m['macro_roc_auc']:.4f}   {span(ci.get('macro_roc_auc'))}",
        f"{'class':<11}" + "".join(f"{name:>13}" for name in PER_CLASS_METRICS),
    ]
    for key in KEYS:
        lines.append(
            f"{key:<11}"
            + "".join(f"{m['per_class'][key][name]:>13.4f}" for name in PER_CLASS_METRICS)
        )
    lines.append("confusion (rows true, columns predicted) " + " ".join(m["confusion"]["labels"]))
    lines += [
        f"  {label:<10}" + "".join(f"{v:>7}" for v in row)
        for label, row in zip(m["confusion"]["labels"], m["confusion"]["matrix"])
    ]
    b, bv = m["binary"], m["bacterial_vs_viral"]
    lines.append(
        f"pneumonia vs normal: ROC AUC {b['roc_auc']:.4f} {span(b['ci95'].get('roc_auc'))}  "
        f"sensitivity {b['sensitivity']:.4f}  specificity {b['specificity']:.4f}"
    )
    lines.append(
        f"bacterial vs viral (n={bv['n']}): ROC AUC {bv['roc_auc']:.4f} {span(bv['ci95'].get('roc_auc'))}  "
        f"accuracy {bv['accuracy']:.4f}  sensitivity {bv['sensitivity']:.4f}  "
        f"specificity {bv['specificity']:.4f}"
    )
    return "\n".join(lines)
