import numpy as np
import pytest
from sklearn import metrics as skm

from pneumoscope.evaluation import (
    choose_thresholds, evaluate_predictions, sensitivity_threshold, youden_threshold,
)

Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
P = np.array([0.05, 0.2, 0.35, 0.6, 0.8, 0.3, 0.55, 0.62, 0.7, 0.75, 0.81, 0.9, 0.93, 0.97, 0.99])


def test_metrics_equal_scikit_learn_on_hand_made_case():
    m = evaluate_predictions(Y, P, threshold=0.6, n_boot=200)
    pred = (P >= 0.6).astype(int)
    # by hand: positives predicted >= 0.6: 8 of 10 (0.3, 0.55 missed); negatives >= 0.6: 2 of 5
    assert m["confusion"] == {"tp": 8, "fp": 2, "tn": 3, "fn": 2}
    assert m["n"] == 15 and m["threshold"] == 0.6
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(Y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, P))
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        lo, hi = m["ci95"][key]
        assert lo <= m[key] <= hi and lo < hi


def test_youden_threshold_maximises_j():
    t = youden_threshold(Y, P)
    def j(th):
        pred = P >= th
        return pred[Y == 1].mean() + (~pred[Y == 0]).mean() - 1
    assert j(t) == pytest.approx(max(j(th) for th in np.unique(P)))
    assert t in P


def test_sensitivity_threshold_is_highest_reaching_target():
    t = sensitivity_threshold(Y, P, 0.95)
    assert (P[Y == 1] >= t).mean() >= 0.95
    higher = P[P > t]
    # any higher candidate threshold misses the target
    assert all((P[Y == 1] >= h).mean() < 0.95 for h in higher)
    assert t == 0.3  # the lowest positive must be caught to reach 95% of 10 positives


def test_choose_thresholds_names_default():
    chosen = choose_thresholds(Y, P)
    assert chosen["default"] == "youden"
    assert chosen["threshold"] == chosen["rules"]["youden"]
    assert chosen["rules"]["sensitivity95"] <= chosen["rules"]["youden"]
