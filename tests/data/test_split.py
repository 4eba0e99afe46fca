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


def hand_built_three_class(n_normal=300, n_bacterial=300, n_viral=20):
    """One film per patient, named as Kermany's; few viral patients among many bacterial ones,
    so a split stratified only on normal vs pneumonia draws the viral share by chance."""
    from pathlib import Path

    from pneumoscope.data.discover import Sample

    samples = [
        Sample(Path(f"NORMAL/IM-{i:04d}-0001.jpeg"), 0, f"normal{i}") for i in range(n_normal)
    ]
    samples += [
        Sample(Path(f"PNEUMONIA/person{i}_bacteria_{i}.jpeg"), 1, f"b{i}")
        for i in range(n_bacterial)
    ]
    samples += [
        Sample(Path(f"PNEUMONIA/person{i}_virus_{i}.jpeg"), 1, f"v{i}") for i in range(n_viral)
    ]
    three = np.array([0] * n_normal + [1] * n_bacterial + [2] * n_viral)
    return samples, three


def val_shares(samples, three, val):
    chosen = {s.path for s in val}
    in_val = np.array([s.path in chosen for s in samples])
    return [in_val[three == k].mean() for k in (0, 1, 2)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_three_class_strata_give_every_class_its_share(seed):
    samples, three = hand_built_three_class()
    _, val = split_by_patient(samples, val_fraction=0.2, seed=seed, strata=three)
    for k, share in enumerate(val_shares(samples, three, val)):
        assert abs(share - 0.2) <= 0.02, (k, share)


def test_a_normal_vs_pneumonia_split_misses_the_viral_share():
    # what the test above guards against: strata on the binary label alone leave the 20 viral
    # patients' share to chance (0.2 +- 0.1 here), so at least one seed is far off
    samples, three = hand_built_three_class()
    off = [
        abs(val_shares(samples, three, split_by_patient(samples, 0.2, seed=s)[1])[2] - 0.2)
        for s in range(5)
    ]
    assert max(off) > 0.02, off
