import numpy as np
import pytest
from sklearn import metrics as skm

from pneumoscope.evaluation.metrics import (
    DEFAULT_THRESHOLD_RULE,
    SENSITIVITY_RULES,
    choose_thresholds,
    evaluate_predictions,
    sensitivity_threshold,
    youden_threshold,
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
    assert chosen["default"] == DEFAULT_THRESHOLD_RULE
    assert chosen["threshold"] == chosen["rules"][DEFAULT_THRESHOLD_RULE]
    assert chosen["rules"]["sensitivity95"] <= chosen["rules"]["youden"]
    assert set(chosen["rules"]) == {"youden", *SENSITIVITY_RULES}


# 100 positives scored 0.01 .. 1.00 and 100 negatives at 0.005 .. 0.500: sensitivity at a
# threshold t is the share of positives >= t, so each target has one known answer
Y100 = np.r_[np.zeros(100, int), np.ones(100, int)]
P100 = np.r_[np.arange(1, 101) / 200, np.arange(1, 101) / 100]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("sensitivity95", 0.06),
        ("sensitivity97", 0.04),
        ("sensitivity98", 0.03),
        ("sensitivity99", 0.02),
    ],
)
def test_sensitivity_rules_pick_what_their_names_say(rule, expected):
    """sensitivityNN: the highest threshold that still catches NN of 100 positives."""
    t = choose_thresholds(Y100, P100)["rules"][rule]
    target = SENSITIVITY_RULES[rule]
    assert t == pytest.approx(expected)
    assert (P100[Y100 == 1] >= t).mean() >= target
    next_up = P100[P100 > t].min()
    assert (P100[Y100 == 1] >= next_up).mean() < target  # one step higher misses the target


def test_stricter_sensitivity_rules_never_raise_the_threshold():
    rules = choose_thresholds(Y, P)["rules"]
    ordered = [rules[name] for name in sorted(SENSITIVITY_RULES, key=SENSITIVITY_RULES.get)]
    assert ordered == sorted(ordered, reverse=True)


def _ci_widths(m: dict) -> dict:
    return {k: hi - lo for k, (lo, hi) in m["ci95"].items()}


def test_copies_of_a_patients_image_do_not_narrow_the_interval():
    """Four copies of each image under its own patient's name are still one patient each:
    the patient bootstrap gives the same intervals as one copy (an image bootstrap would
    count them as four times the evidence and narrow every interval)."""
    patients = [f"person{i}" for i in range(len(Y))]
    once = evaluate_predictions(Y, P, 0.6, n_boot=300, patients=patients)
    four = evaluate_predictions(
        np.repeat(Y, 4), np.repeat(P, 4), 0.6, n_boot=300, patients=np.repeat(patients, 4)
    )
    assert four["n"] == 4 * once["n"] and four["n_patients"] == once["n_patients"] == len(Y)
    for key, width in _ci_widths(once).items():
        assert width > 0
        assert _ci_widths(four)[key] == pytest.approx(width), key
    assert "patient" in four["ci_method"]
    # what the image bootstrap did: the copies taken as independent images, a narrower interval
    as_images = evaluate_predictions(np.repeat(Y, 4), np.repeat(P, 4), 0.6, n_boot=300)
    assert _ci_widths(as_images)["roc_auc"] < 0.75 * _ci_widths(once)["roc_auc"]


def test_patient_with_films_of_both_classes_is_drawn_as_pneumonia():
    from pneumoscope.evaluation.bootstrap import patient_strata

    y = np.array([0, 1, 0, 0, 1])
    strata, _, _ = patient_strata(y, ["a", "a", "b", "c", "d"])  # a: one normal, one pneumonia film
    codes = {"a": 0, "b": 1, "c": 2, "d": 3}  # sorted patient ids
    assert [sorted(s) for s in strata] == [[codes["b"], codes["c"]], [codes["a"], codes["d"]]]


def test_sensitivity_threshold_on_saturated_curve():
    """All positives above all negatives: the ROC curve climbs one vertical run at FPR 0.
    roc_curve's default drop_intermediate keeps only the top of that run (the lowest
    positive score, 100% sensitivity); the highest threshold reaching 95% of 20 positives
    is the second-lowest positive score (19 of 20 caught)."""
    neg = np.linspace(0.01, 0.2, 10)
    pos = np.linspace(0.5, 0.99, 20)
    y, p = np.r_[np.zeros(10), np.ones(20)].astype(int), np.r_[neg, pos]
    t = sensitivity_threshold(y, p, 0.95)
    assert t == pytest.approx(pos[1])
    assert (pos >= t).mean() == pytest.approx(0.95)


def test_resample_metrics_equal_scikit_learns_on_every_kind_of_resample():
    """The bootstrap scores each resample in numpy (resample_metrics): the same numbers as
    the sklearn path (binary_point_metrics) on resamples with ties, float32 scores, one class
    missing and thresholds between and on the scores."""
    from pneumoscope.evaluation.bootstrap import draw_images, patient_strata
    from pneumoscope.evaluation.metrics import CI_METRICS, binary_point_metrics, resample_metrics

    rng = np.random.default_rng(0)
    cases = [
        (Y, P),
        (Y, np.round(P, 1)),
        (Y, P.astype(np.float32).astype(float)),
        (np.ones(6, int), P[:6]),
    ]
    for _ in range(15):
        n = int(rng.integers(2, 40))
        cases.append((rng.integers(0, 2, n), np.round(rng.random(n), int(rng.integers(1, 4)))))
    strata, blocks, order = patient_strata(Y, [f"p{i // 2}" for i in range(len(Y))])
    for _ in range(15):  # patient resamples as bootstrap_ci draws them (repeated images)
        idx = draw_images(rng, strata, blocks, order)
        cases.append((Y[idx], P[idx]))
    for i, (y, p) in enumerate(cases):
        for threshold in (0.6, float(p[0])) + (
            (0.0, 1.0) if i == 0 else ()
        ):  # between, on, the ends
            want, got = binary_point_metrics(y, p, threshold), resample_metrics(y, p, threshold)
            for key in CI_METRICS:
                assert got[key] == pytest.approx(want[key], abs=1e-12, nan_ok=True), (
                    key,
                    y,
                    p,
                    threshold,
                )
