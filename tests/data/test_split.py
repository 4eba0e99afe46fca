import numpy as np
import pytest

from pneumoscope.data.discover import discover_split
from pneumoscope.data.split import split_by_patient


@pytest.fixture(scope="module")
def train_samples(shared_data):
    return discover_split(shared_data / "train", "train")


@pytest.mark.parametrize("seed", [0, 1])
def test_split_keeps_patients_on_one_side_and_class_ratios(train_samples, seed):
    train, val = split_by_patient(train_samples, val_fraction=0.15, seed=seed)
    assert len(train) + len(val) == len(train_samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    frac = len(val) / len(train_samples)
    assert 0.10 < frac < 0.20
    ratio = lambda xs: np.mean([s.label for s in xs])  # noqa: E731
    assert abs(ratio(train) - ratio(val)) < 0.03  # within a few points


def test_split_is_seeded(train_samples):
    a = split_by_patient(train_samples, 0.15, seed=3)[1]
    b = split_by_patient(train_samples, 0.15, seed=3)[1]
    c = split_by_patient(train_samples, 0.15, seed=4)[1]
    assert [s.path for s in a] == [s.path for s in b]
    assert [s.path for s in a] != [s.path for s in c]


def test_split_rejects_bad_fraction(train_samples):
    with pytest.raises(ValueError):
        split_by_patient(train_samples, 0.7)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.4])
def test_split_honours_the_requested_fraction(train_samples, fraction):
    # round(1/f) folds gave 0.3 -> 33% and 0.4 -> 50%: the request is now what happens
    train, val = split_by_patient(train_samples, val_fraction=fraction, seed=0)
    assert abs(len(val) / len(train_samples) - fraction) < 0.02
    for label in (0, 1):  # and per class, not only overall
        n = sum(s.label == label for s in train_samples)
        assert abs(sum(s.label == label for s in val) / n - fraction) < 0.025
    assert not {s.patient for s in train} & {s.patient for s in val}


def test_split_stratifies_on_given_strata(train_samples):
    # three strata (normal / bacterial / viral, from the Kermany file names)
    kind = lambda s: 0 if s.label == 0 else (1 if "bacteria" in s.path.name else 2)  # noqa: E731
    strata = np.array([kind(s) for s in train_samples])
    assert set(strata.tolist()) == {0, 1, 2}
    train, val = split_by_patient(train_samples, val_fraction=0.3, seed=1, strata=strata)
    assert not {s.patient for s in train} & {s.patient for s in val}
    for k in (0, 1, 2):
        n = int((strata == k).sum())
        share = sum(kind(s) == k for s in val) / n
        assert abs(share - 0.3) < 0.04, (k, share)
    with pytest.raises(ValueError, match="strata has"):
        split_by_patient(train_samples, 0.3, strata=strata[:-1])
