"""predict and explain through the command line: nothing scored is exit 2 with one line
(a missing path, only unreadable files, an empty folder; with or without --strict), and
when some files were skipped they say how many."""

from __future__ import annotations

import csv
import logging

import pytest

from pneumoscope.cli import main

VERBS = ("predict", "explain")


@pytest.fixture(scope="module")
def films(shared_data):
    return sorted((shared_data / "val" / "NORMAL").glob("*.jpeg"))[:2]


@pytest.fixture
def bad_folder(tmp_path):
    """A folder of two files named like images that are not: half a JPEG and a text file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "half.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    (folder / "notes.png").write_text("not an image\n")
    return folder


def run_verb(verb: str, run_dir, paths, tmp_path, *extra) -> list[str]:
    out = ["--out", str(tmp_path / ("p.csv" if verb == "predict" else "overlays"))]
    return ["-q", verb, str(run_dir), *map(str, paths), *out, *extra]


def one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumoscope {verb}: error: nothing scored: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("strict", [[], ["--strict"]], ids=["lenient", "strict"])
@pytest.mark.parametrize("verb", VERBS)
def test_a_missing_path_is_exit_2(verb, strict, small_run_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_film.jpeg"
    assert main(run_verb(verb, small_run_dir, [missing], tmp_path, *strict)) == 2
    err = one_line_error(capsys, verb)
    assert str(missing) in err and "No such file" in err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("strict", [[], ["--strict"]], ids=["lenient", "strict"])
@pytest.mark.parametrize("verb", VERBS)
def test_only_unreadable_files_is_exit_2(verb, strict, small_run_dir, bad_folder, tmp_path, capsys):
    assert main(run_verb(verb, small_run_dir, [bad_folder], tmp_path, *strict)) == 2
    err = one_line_error(capsys, verb)
    assert "half.jpeg" in err and "(and 1 more unreadable file(s))" in err


@pytest.mark.parametrize("strict", [[], ["--strict"]], ids=["lenient", "strict"])
@pytest.mark.parametrize("verb", VERBS)
def test_an_empty_folder_is_exit_2(verb, strict, small_run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(run_verb(verb, small_run_dir, [empty], tmp_path, *strict)) == 2
    err = one_line_error(capsys, verb)
    assert f"no image files (.jpeg, .jpg, .png, .dcm, .dicom) in {empty}" in err


@pytest.mark.parametrize("verb", VERBS)
def test_some_skipped_are_counted_and_the_rest_scored(
    verb, small_run_dir, bad_folder, films, tmp_path, caplog, capsys
):
    with caplog.at_level(logging.WARNING):
        assert main(run_verb(verb, small_run_dir, [*films, bad_folder], tmp_path)) == 0
    assert any("skipping 2 unreadable file(s)" in r.getMessage() for r in caplog.records)
    if verb == "predict":
        with open(tmp_path / "p.csv") as handle:
            assert [row["path"] for row in csv.DictReader(handle)] == [str(f) for f in films]
    else:
        assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == sorted(
            f"{f.stem}_gradcam.png" for f in films
        )
