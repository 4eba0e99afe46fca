"""predict over an archive: the onnxruntime engine by default (equal to torch within 1e-4),
the CSV written batch by batch, --resume, --files, decode workers, torchrun shards.

All on real films: the embedded sample (data/sample/) and the small run trained on it.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.deploy.archive import predict_archive, shard
from pneumoscope.deploy.scoring import ENGINE_FILE, CheckedOnnx, load_scorer

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def run(small_run_dir, tmp_path_factory) -> Path:
    """A copy of the small run that the engine may be cached in."""
    return Path(shutil.copytree(small_run_dir, tmp_path_factory.mktemp("archive") / "run"))


@pytest.fixture(scope="module")
def films() -> list[str]:
    """60 real films of the sample (both classes, train and val)."""
    files = sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))
    return files[:: max(1, len(files) // 60)][:60]


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def probabilities(rows: list[list[str]]) -> dict[str, float]:
    return {r[0]: float(r[1]) for r in rows[1:]}


def test_default_engine_is_onnxruntime_and_equals_torch(run, films, tmp_path, capsys):
    onnx_csv, torch_csv = tmp_path / "onnx.csv", tmp_path / "torch.csv"
    assert main(["-q", "predict", str(run), *films, "--out", str(onnx_csv)]) == 0
    assert "[onnxruntime]" in capsys.readouterr().out
    assert (run / ENGINE_FILE).is_file() and (run / f"{ENGINE_FILE}.json").is_file()
    assert (
        main(["-q", "predict", str(run), *films, "--out", str(torch_csv), "--engine", "torch"]) == 0
    )
    assert "[torch]" in capsys.readouterr().out
    got, want = probabilities(read_rows(onnx_csv)), probabilities(read_rows(torch_csv))
    assert list(got) == list(want) == films
    # 1e-4 between the engines, plus the CSV's 6-decimal rounding
    assert max(abs(got[f] - want[f]) for f in films) <= 1e-4 + 1e-6


def test_engine_is_reused_and_rebuilt_when_it_no_longer_fits(run, films):
    load_scorer(run)  # built (or already there)
    stamp = (run / ENGINE_FILE).stat().st_mtime_ns
    scorer = load_scorer(run)
    assert isinstance(scorer, CheckedOnnx) and (run / ENGINE_FILE).stat().st_mtime_ns == stamp
    # swapped: its SHA-256 no longer fits
    (run / ENGINE_FILE).write_bytes(b"not the exported model")
    scorer = load_scorer(run)
    assert isinstance(scorer, CheckedOnnx) and (run / ENGINE_FILE).stat().st_size > 1000
    images = np.stack([scorer.load(f) for f in films[:6]])
    assert (
        np.abs(scorer.predict_class_probs(images) - scorer.torch.predict_class_probs(images)).max()
        <= 1e-4
    )


def test_an_engine_that_disagrees_with_torch_is_dropped(run, films, caplog):
    scorer = load_scorer(run)
    onnx_probs = scorer.onnx.predict_class_probs
    scorer.onnx.predict_class_probs = lambda images, show_progress=False: onnx_probs(images) * 0.9
    images = np.stack([scorer.load(f) for f in films[:5]])
    with caplog.at_level(logging.WARNING):
        got = scorer.predict_class_probs(images)
    assert scorer.runtime == "torch" and "differs from torch" in caplog.text
    np.testing.assert_array_equal(got, scorer.torch.predict_class_probs(images))


def test_torch_is_used_where_onnxruntime_is_not_asked_for(run, monkeypatch):
    assert load_scorer(run, engine="torch").runtime == "torch"
    monkeypatch.setenv("PNEUMOSCOPE_ENGINE", "torch")
    assert load_scorer(run).runtime == "torch"
    # torch's autocast: not what the export computes
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "bf16")
    monkeypatch.delenv("PNEUMOSCOPE_ENGINE")
    assert load_scorer(run).runtime == "torch"


def test_workers_and_batches_do_not_change_the_csv(run, films, tmp_path):
    one = tmp_path / "one.csv"
    many = tmp_path / "many.csv"
    predict_archive(run, films, one, workers=0, batch_size=64, show_progress=False)
    summary = predict_archive(run, films, many, workers=2, batch_size=7, show_progress=False)
    assert summary.scored == len(films) and summary.engine == "onnxruntime"
    assert many.read_text() == one.read_text()


def test_resume_after_a_kill_gives_the_uninterrupted_csv(run, films, tmp_path):
    full = tmp_path / "full.csv"
    predict_archive(run, films, full, batch_size=8, show_progress=False)
    lines = full.read_text().splitlines(keepends=True)
    killed = tmp_path / "killed.csv"
    # a kill mid-write: 3 batches complete, the 4th cut in the middle of a row
    killed.write_text("".join(lines[: 1 + 24]) + lines[25][:17])
    summary = predict_archive(run, films, killed, resume=True, batch_size=8, show_progress=False)
    assert (summary.resumed, summary.scored) == (24, len(films) - 24)
    assert killed.read_text() == full.read_text()
    again = predict_archive(run, films, killed, resume=True, show_progress=False)
    assert (again.resumed, again.scored) == (
        len(films),
        0,
    ) and killed.read_text() == full.read_text()


def test_resume_reads_back_paths_with_line_separators_and_quotes(run, films, tmp_path):
    # a file name may hold \u2028, \x1c, a comma or a quote: the CSV quotes it, and --resume
    # must read that row back as one path (not split it where str.splitlines would)
    odd = tmp_path / "films"
    odd.mkdir()
    names = ["a\u2028b.jpeg", "c\x1cd.jpeg", 'e,"f".jpeg', "g\rh.jpeg"]
    for name, film in zip(names, films, strict=False):
        shutil.copy(film, odd / name)
    full = tmp_path / "full.csv"
    predict_archive(run, [odd], full, batch_size=2, show_progress=False)
    rows = full.read_bytes().split(b"\n")
    killed = tmp_path / "killed.csv"
    complete = [r for r in rows if r]
    assert len(read_rows(full)) == 1 + len(names)  # one row a film, quoted where it must be
    killed.write_bytes(full.read_bytes()[: len(complete[0]) + 1 + len(complete[1]) + 1])
    summary = predict_archive(run, [odd], killed, resume=True, batch_size=2, show_progress=False)
    assert (summary.resumed, summary.scored) == (1, len(names) - 1)
    assert killed.read_bytes() == full.read_bytes()
    # the same names, one a line, in a --files list with CRLF line ends
    listing = tmp_path / "films.txt"
    listed = sorted(str(odd / n) for n in names)  # "\r" inside a name: only "\r\n" ends a line
    listing.write_text("\r\n".join(listed) + "\r\n", newline="")
    by_list = tmp_path / "list.csv"
    predict_archive(run, [], by_list, files_list=listing, show_progress=False)
    assert [row[0] for row in read_rows(by_list)[1:]] == listed


def test_a_file_named_twice_is_scored_once_and_resumes_alike(run, films, tmp_path, caplog):
    listing = tmp_path / "films.txt"
    listing.write_text("\n".join(films[:6] + films[2:4]) + "\n")  # two named twice
    full = tmp_path / "full.csv"
    with caplog.at_level(logging.WARNING):
        predict_archive(run, [films[0]], full, files_list=listing, show_progress=False)
    assert "3 file(s) named more than once" in caplog.text  # films[0] by name and in the list
    assert [r[0] for r in read_rows(full)[1:]] == films[:6]
    killed = tmp_path / "killed.csv"
    killed.write_text("".join(full.read_text().splitlines(keepends=True)[:4]))  # 3 rows done
    predict_archive(run, [films[0]], killed, files_list=listing, resume=True, show_progress=False)
    assert killed.read_text() == full.read_text()


def test_resume_refuses_another_table(run, films, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("path,score\nx.jpeg,0.5\n")
    assert main(["-q", "predict", str(run), films[0], "--out", str(other), "--resume"]) == 2
    assert "--resume found another table" in capsys.readouterr().err
    assert other.read_text() == "path,score\nx.jpeg,0.5\n"


def test_files_list_scores_the_listed_files(run, films, tmp_path):
    listing = tmp_path / "films.txt"
    listing.write_text(
        "# the films of the archive\n"
        + "\n".join(films[:10])
        + "\n\n"
        + "\n".join(films[10:])
        + "\n"
    )
    by_list, by_name = tmp_path / "list.csv", tmp_path / "names.csv"
    assert main(["-q", "predict", str(run), "--files", str(listing), "--out", str(by_list)]) == 0
    assert main(["-q", "predict", str(run), *films, "--out", str(by_name)]) == 0
    assert by_list.read_text() == by_name.read_text()


def test_unreadable_files_are_named_and_skipped(run, films, tmp_path, caplog):
    folder = tmp_path / "films"
    folder.mkdir()
    for f in films[:5]:
        shutil.copy(f, folder)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "-q",
                    "predict",
                    str(run),
                    str(folder),
                    "--out",
                    str(out),
                    "--workers",
                    "2",
                    "--batch-size",
                    "2",
                ]
            )
            == 0
        )
    assert len(read_rows(out)) == 1 + 5
    assert "broken.jpeg" in caplog.text


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_nothing_to_score_is_one_line_and_exit_2(run, tmp_path, capsys, what):
    target = tmp_path / "nowhere"
    if what == "empty":
        target.mkdir()
    assert main(["-q", "predict", str(run), str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0]
    # issue 28's one wording
    assert err[0].startswith("pneumoscope predict: error: nothing scored: ")
    assert ("No such file" in err[0]) if what == "missing" else ("no image files" in err[0])


def test_shards_are_contiguous_and_cover_the_list_once():
    files = [f"f{i}" for i in range(11)]
    for world in (1, 2, 3, 4):
        parts = [shard(files, r, world) for r in range(world)]
        assert sum(parts, []) == files
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow
def test_torchrun_two_ranks_join_the_single_process_csv(run, films, tmp_path):
    single, joined = tmp_path / "single.csv", tmp_path / "joined.csv"
    predict_archive(run, films, single, show_progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pneumoscope",
        "-q",
        "predict",
        str(run),
        *films,
        "--out",
        str(joined),
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert joined.read_text() == single.read_text()
    assert not list(tmp_path.glob("joined.csv.rank*"))  # the parts are gone


@pytest.mark.slow  # quantizes
def test_int8_is_kept_only_where_validation_auc_holds(run, films, tmp_path, capsys):
    from pneumoscope.deploy.quantize import CHECK_FILE, INT8_FILE, MAX_AUC_DIFF
    from pneumoscope.rundir import read_json

    int8_csv, fp32_csv = tmp_path / "int8.csv", tmp_path / "fp32.csv"
    assert main(["-q", "predict", str(run), *films, "--out", str(int8_csv), "--int8"]) == 0
    said = capsys.readouterr().out
    record = read_json(run / CHECK_FILE)
    assert record["films"] > 0 and {"val_roc_auc_fp32", "val_roc_auc_int8", "max_abs_dp"} <= set(
        record
    )
    assert record["kept"] == (
        abs(record["val_roc_auc_int8"] - record["val_roc_auc_fp32"]) <= MAX_AUC_DIFF
    )
    assert main(["-q", "predict", str(run), *films, "--out", str(fp32_csv)]) == 0
    capsys.readouterr()
    if record["kept"]:
        assert "[onnxruntime int8]" in said and (run / INT8_FILE).is_file()
        assert read_json(run / f"{INT8_FILE}.json")["quantization"]["kept"] is True
    else:  # refused: fp32 scored, and nothing of the int8 graph is left
        assert "[onnxruntime]" in said and not (run / INT8_FILE).exists()
        assert int8_csv.read_text() == fp32_csv.read_text()
    stamp = (run / CHECK_FILE).stat().st_mtime_ns  # judged once per engine
    assert main(["-q", "predict", str(run), films[0], "--int8"]) == 0
    assert (run / CHECK_FILE).stat().st_mtime_ns == stamp
    assert main(["-q", "predict", str(run), films[0], "--int8", "--engine", "torch"]) == 2


def test_join_names_a_part_it_cannot_see(tmp_path):
    """Every rank writes its part (a header at least, for an empty or unreadable shard);
    one missing at the join means OUT's folder is not shared by the machines: an error
    that says so, not a CSV without that rank's rows."""
    from types import SimpleNamespace

    from pneumoscope.deploy.archive import join_parts, part_path
    from pneumoscope.errors import DataError

    out, header = tmp_path / "p.csv", ["path", "p_pneumonia", "label"]
    env = SimpleNamespace(world_size=3, is_main=True, barrier=lambda: None, broadcast=lambda x: x)
    for rank, rows in ((0, ["a.jpeg,0.1,NORMAL\n"]), (2, ["c.jpeg,0.9,PNEUMONIA\n"])):
        part_path(out, rank, 3).write_text(",".join(header) + "\n" + "".join(rows))
    with pytest.raises(DataError, match="p.csv.rank1-of-3.part.*one shared folder"):
        join_parts(out, env, header, ["a.jpeg", "b.jpeg", "c.jpeg"])
    assert not out.exists()


def test_join_orders_the_rows_by_the_list_and_keeps_outs_rows_on_resume(tmp_path):
    from types import SimpleNamespace

    from pneumoscope.deploy.archive import join_parts, part_path

    out, header = tmp_path / "p.csv", ["path", "p_pneumonia", "label"]
    env = SimpleNamespace(world_size=2, is_main=True, barrier=lambda: None, broadcast=lambda x: x)
    # an earlier run's rows: b, and a, which this run's part scored again (the part wins)
    out.write_text("path,p_pneumonia,label\nb.jpeg,0.5,PNEUMONIA\na.jpeg,0.9,OLD\n")
    part_path(out, 1, 2).write_text("path,p_pneumonia,label\nd.jpeg,0.7,PNEUMONIA\n")
    part_path(out, 0, 2).write_text("path,p_pneumonia,label\na.jpeg,0.1,NORMAL\n")
    part_path(out, 0, 3).write_text("path,p_pneumonia,label\nc.jpeg,0.2,NORMAL\n")  # 3 processes
    join_parts(out, env, header, ["a.jpeg", "b.jpeg", "c.jpeg", "d.jpeg"], resume=True)
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == [
        "path",
        "a.jpeg",
        "b.jpeg",
        "c.jpeg",
        "d.jpeg",
    ]
    assert "a.jpeg,0.1,NORMAL" in out.read_text() and "OLD" not in out.read_text()
    assert not list(tmp_path.glob("p.csv.rank*"))


def test_resume_cuts_a_torn_row_whose_quoted_path_holds_a_line_end(tmp_path):
    from pneumoscope.deploy.archive import read_done

    header = ["path", "p_pneumonia", "label"]
    csv_path = tmp_path / "p.csv"
    whole = 'path,p_pneumonia,label\na.jpeg,0.1,NORMAL\n"b\nc.jpeg",0.2,NORMAL\n'
    csv_path.write_text(whole + '"d\ne.jpeg",0.3')  # a kill in the middle of the last row
    assert read_done(csv_path, header) == {"a.jpeg", "b\nc.jpeg"}
    assert csv_path.read_text() == whole  # cut at the last complete row, not inside a path


def test_one_process_resumes_what_a_killed_torchrun_left(run, films, tmp_path):
    from pneumoscope.deploy.archive import part_path

    full = tmp_path / "full.csv"
    predict_archive(run, films, full, show_progress=False)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "out.csv"
    half = len(films) // 2
    # two ranks killed mid-way: rank 0 wrote 20 of its rows, rank 1 five and half a row
    part_path(out, 0, 2).write_text("".join(lines[: 1 + 20]))
    part_path(out, 1, 2).write_text("".join(lines[:1] + lines[1 + half : 1 + half + 5]) + "x.jp")
    summary = predict_archive(run, films, out, resume=True, show_progress=False)
    assert (summary.resumed, summary.scored) == (25, len(films) - 25)
    assert out.read_text() == full.read_text()
    assert not list(tmp_path.glob("out.csv.rank*"))


@pytest.mark.slow  # torchrun subprocesses
def test_torchrun_resumes_a_killed_single_process_csv(run, films, tmp_path):
    full = tmp_path / "full.csv"
    predict_archive(run, films, full, show_progress=False)
    out = tmp_path / "out.csv"
    out.write_text("".join(full.read_text().splitlines(keepends=True)[: 1 + 17]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pneumoscope", "-q", "predict", str(run), *films, "--out", str(out)]
    done = subprocess.run(
        cmd + ["--resume", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text() == full.read_text()
    assert not list(tmp_path.glob("out.csv.rank*"))


@pytest.mark.slow  # torchrun subprocesses
def test_torchrun_ranks_stop_together_on_strict_and_on_nothing_readable(run, films, tmp_path):
    # a rank that stopped alone would leave the others waiting: both cases end the run on
    # every rank (torchrun itself then exits 1), write no CSV and leave no part behind
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpeg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (bad / "empty.jpeg").write_bytes(b"")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    base += ["-m", "pneumoscope", "-q", "predict", str(run)]
    cases = {
        "strict": ([*films[:6], str(bad / "broken.jpeg")], ["--strict"], "broken.jpeg"),
        "nothing": ([str(bad)], [], "nothing scored"),
    }
    for name, (paths, options, said) in cases.items():
        out = tmp_path / f"{name}.csv"
        cmd = [*base, *paths, "--out", str(out), "--device", "cpu", *options]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode != 0 and said in done.stderr, (name, done.stderr[-2000:])
        assert not out.exists() and not list(tmp_path.glob(f"{name}.csv.rank*")), name
