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
