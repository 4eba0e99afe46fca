"""The report's data card describes the folder it was given: that folder's counts,
classes and patients, and the Kermany et al. source only when the files are that set's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumoscope.data.discover import discover_split, kermany_named, patient_id
from pneumoscope.report import build_report
from pneumoscope.report.build import data_card

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_VAL = REPO / "data" / "sample" / "val"  # the 16 official val images (8 + 8)
CONFIG = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 224}


def renamed_copy(src: Path, dst: Path) -> Path:
    """The same real images under names of another data set (case_NNN.jpeg)."""
    n = 0
    for cls in ("NORMAL", "PNEUMONIA"):
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.jpeg")):
            n += 1
            shutil.copyfile(f, dst / cls / f"case_{n:03d}.jpeg")
    return dst


@pytest.fixture(scope="module")
def official_val() -> Path:
    if not all(any((OFFICIAL_VAL / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA")):
        pytest.fail(f"embedded sample missing: {OFFICIAL_VAL}")
    return OFFICIAL_VAL


def test_card_of_the_kermany_set_counts_that_folder_and_names_the_source(official_val, tmp_path):
    samples = discover_split(official_val)
    files = sorted(official_val.glob("*/*.jpeg"))
    patients = {patient_id(f.name) for f in files}
    card = data_card(tmp_path, CONFIG, samples, 0, str(official_val))
    normal = len(list((official_val / "NORMAL").glob("*.jpeg")))
    assert (
        f"{len(files)} readable (NORMAL {normal}, PNEUMONIA {len(files) - normal}); 0 unreadable"
        in card
    )
    # several films per patient
    assert f"{len(patients)} patients" in card and len(patients) < len(files)
    assert "Guangzhou" in card and "doi:10.17632/rscbjbr9sj" in card and "CC BY 4.0" in card


def test_card_of_another_data_set_claims_no_kermany_source(official_val, tmp_path):
    other = renamed_copy(official_val, tmp_path / "other")
    samples = discover_split(other)
    assert not any(kermany_named(s.path.name) for s in samples)
    card = data_card(tmp_path, CONFIG, samples, 2, str(other))
    assert "Guangzhou" not in card and "Kermany, Daniel" not in card and "rscbjbr9sj" not in card
    assert "not known to pneumoscope" in card
    assert f"{len(samples)} readable" in card and "2 unreadable" in card
    assert f"({len(samples)} patients)" in card  # each unnamed file is its own patient


@pytest.mark.slow  # builds a report
def test_report_page_on_other_data_drops_the_kermany_footer(report_run, report_split, tmp_path):
    other = renamed_copy(report_split, tmp_path / "site_b")
    index = build_report(
        report_run,
        other,
        tmp_path / "report",
        n_boot=50,
        perplexity=5,
        per_group=1,
        show_progress=False,
    )
    page = index.read_text(encoding="utf-8")
    assert "Guangzhou" not in page and "Kermany et al. 2018, CC BY 4.0" not in page
    assert "not known to pneumoscope" in page and str(other) in page
