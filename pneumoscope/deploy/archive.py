"""`pneumoscope predict` over an archive: stream, write as it goes, resume, shard.

``predict_archive`` lists the files (folders searched, or ``--files LIST.txt``), decodes
them in worker processes (pneumoscope.data.workers) while the model scores the previous
batch (pneumoscope.deploy.scoring: onnxruntime where it applies), and appends each batch's rows
to the CSV with a flush: memory stays flat, and a killed run loses at most the batch it
was on. ``--resume`` keeps the rows the CSV already holds and scores the rest.

Under ``torchrun --nproc-per-node N -m pneumoscope predict ... --out OUT`` each rank
scores a contiguous shard of the sorted list into ``OUT.rankR.part`` and rank 0 joins
the parts, in rank order, into OUT: the same rows in the same order as one process.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pneumoscope.data.cache import report_failures
from pneumoscope.data.workers import decoded_batches, default_workers
from pneumoscope.errors import DataError, MissingFileError, OptionError
from pneumoscope.tasks import bv_threshold_of, prediction_columns, prediction_rows

log = logging.getLogger(__name__)

# Films per model call: onnxruntime's rate on the 2-core VM levels off from 32 (benchmarks/predict_bench.py).
DEFAULT_BATCH = 32


@dataclass
class PredictSummary:
    scored: int = 0  # rows written by this run
    resumed: int = 0  # rows the CSV held already (--resume)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    engine: str = "torch"


def list_files(paths: list[str | Path], files_list: str | Path | None = None) -> list[str]:
    """The files to score, in a fixed order: each path as given (a folder: its images,
    searched recursively, sorted), then the lines of `files_list` (blank lines and #
    comments skipped). A path that does not exist, or nothing to score, is an error."""
    from pneumoscope.data.sources import expand_paths, require_image_files
    from pneumoscope.errors import NothingScoredError

    named = [str(p) for p in paths]
    for path in named:
        if not os.path.lexists(path):
            raise NothingScoredError(f"nothing scored: {path}: No such file or folder")
    files = [str(p) for p in expand_paths(named)]
    if files_list is not None:
        files += read_files_list(files_list)
    require_image_files(files, named + ([str(files_list)] if files_list else []))
    return files


def read_files_list(files_list: str | Path) -> list[str]:
    """One path a line; relative paths are taken from the current folder."""
    try:
        lines = Path(files_list).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise MissingFileError(f"{files_list}: no such file list") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{files_list}: cannot read the file list ({err})") from err
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def shard(files: list[str], rank: int, world: int) -> list[str]:
    """Rank's contiguous share of the list (sizes differ by at most one)."""
    n = len(files)
    return files[rank * n // world : (rank + 1) * n // world]


def part_path(out: Path, rank: int, world: int) -> Path:
    return out if world == 1 else out.with_name(f"{out.name}.rank{rank}.part")


def read_done(csv_path: Path, header: list[str]) -> set[str]:
    """The paths a CSV already holds. A last line cut off by a kill is dropped (the file
    is truncated to its last complete row); another header is refused."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return set()
    data = csv_path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(csv_path, "r+b") as handle:
            handle.truncate(len(complete))
    rows = list(csv.reader(complete.decode("utf-8").splitlines()))
    if rows and rows[0] != header:
        raise DataError(
            f"{csv_path}: --resume found another table (columns {','.join(rows[0])}; "
            f"this run writes {','.join(header)})"
        )
    return {row[0] for row in rows[1:] if row}


class CsvSink:
    """Rows appended batch by batch, each batch flushed (stdout when path is None)."""

    def __init__(self, path: Path | None, header: list[str], append: bool):
        self.header = header
        fresh = path is None or not append or not path.exists() or path.stat().st_size == 0
        self.handle = (
            sys.stdout
            if path is None
            else open(path, "a" if append else "w", newline="", encoding="utf-8")
        )
        self.writer = csv.writer(self.handle, lineterminator="\n")
        if fresh:
            self.writer.writerow(header)
            self.handle.flush()

    def write(self, rows: list[dict]) -> None:
        self.writer.writerows(
            [f"{v:.6f}" if isinstance(v, float) else v for v in (r[k] for k in self.header)]
            for r in rows
        )
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


def predict_archive(
    run_dir: str | Path,
    paths: list[str | Path],
    out: str | Path | None = None,
    *,
    files_list: str | Path | None = None,
    resume: bool = False,
    threshold_rule: str | None = None,
    strict: bool = False,
    engine: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    reduced: bool = False,
    device: str | None = None,
    onnx: str | Path | None = None,
    int8: bool = False,
    show_progress: bool = True,
) -> PredictSummary:
    """Score every file of `paths` / `files_list` into the CSV `out` (stdout: None).
    strict: an unreadable file stops the scoring (decoding goes on, so the error names
    every one) and a CSV this run started is removed. reduced: JPEG draft decoding
    (data.decode.load_image). onnx: a user's export instead of the engine; int8: the engine
    quantized where validation allows (both: scoring.load_scorer).
    Under torchrun: one shard per rank, joined by rank 0."""
    from pneumoscope.deploy.scoring import load_scorer
    from pneumoscope.training.distributed import init_from_env

    if resume and out is None:
        raise OptionError("--resume needs --out (the CSV to go on with)")
    env = init_from_env(device or "auto")
    if env.world_size > 1 and out is None:
        raise OptionError(
            "under torchrun, predict needs --out (rank 0 joins the ranks' rows into it)"
        )
    # ranks on one machine share its cores: each takes its part for onnxruntime and decoding
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if workers is None and env.world_size > 1:
        workers = min(cores, default_workers())
    scorer = load_scorer(
        run_dir,
        engine,
        str(env.device),
        threads=cores if env.world_size > 1 else None,
        onnx=onnx,
        int8=int8,
    )
    # after the run: a broken run is named first, whatever the paths
    files = list_files(paths, files_list)
    header = ["path", *prediction_columns(scorer.task), "label"]
    if resume and env.world_size > 1 and Path(out).exists():  # joined: the sharded run had finished
        return PredictSummary(resumed=len(read_done(Path(out), header)), engine=scorer.runtime)
    target = part_path(Path(out), env.rank, env.world_size) if out is not None else None
    done = read_done(target, header) if resume else set()
    mine = [f for f in shard(files, env.rank, env.world_size) if f not in done]
    summary = score_files(
        scorer,
        mine,
        target,
        header,
        threshold_rule,
        strict,
        batch_size or DEFAULT_BATCH,
        workers,
        reduced,
        append=resume,
        show_progress=show_progress and env.is_main,
        whole=env.world_size == 1,
    )
    summary.resumed = len(done)
    if env.world_size > 1:
        join_parts(Path(out), env, header)
    return summary


def score_files(
    scorer,
    files: list[str],
    target: Path | None,
    header: list[str],
    threshold_rule: str | None,
    strict: bool,
    batch_size: int,
    workers: int | None,
    reduced: bool,
    append: bool,
    show_progress: bool,
    whole: bool = True,
) -> PredictSummary:
    """The loop: decoded batches in, rows out; see predict_archive. whole: these are all the
    files (not one torchrun rank's shard), so none readable is the run's "nothing scored";
    a rank must not stop alone while the others wait to join."""
    threshold = scorer.threshold_for(threshold_rule)
    bv_threshold = bv_threshold_of(scorer.thresholds)
    summary = PredictSummary()
    readable = 0  # films that decoded, scored or not (--strict stops scoring at the first failure)
    sink = CsvSink(target, header, append)
    bar = tqdm(total=len(files), desc="predict", unit="film", disable=not show_progress)
    try:
        for kept, images, failures in decoded_batches(
            files,
            scorer.image_size,
            batch_size,
            default_workers() if workers is None else workers,
            reduced,
        ):
            summary.failures += failures
            readable += len(kept)
            if len(kept) and not (strict and summary.failures):
                probs = scorer.predict_class_probs(images)
                rows = prediction_rows(scorer.task, probs, threshold, bv_threshold)
                sink.write([{"path": p, **r} for p, r in zip(kept, rows)])
                summary.scored += len(kept)
            bar.update(len(kept) + len(failures))
    finally:
        bar.close()
        sink.close()
    summary.engine = scorer.runtime
    # every file unreadable: an error, not an empty CSV
    nothing = whole and readable == 0 and not append
    if (nothing or (strict and summary.failures)) and target is not None and not append:
        target.unlink(missing_ok=True)
    if nothing:
        from pneumoscope.data.sources import require_some_readable

        require_some_readable(0, summary.failures)
    report_failures(summary.failures, strict)
    return summary


def join_parts(out: Path, env, header: list[str]) -> None:
    """Rank 0 writes the ranks' parts, in rank order, into `out` (atomically) and removes them."""
    from pneumoscope.fsio import atomic_write_with

    env.barrier()
    if env.is_main:
        parts = [part_path(out, r, env.world_size) for r in range(env.world_size)]

        def write(handle):
            handle.write((",".join(header) + "\n").encode("utf-8"))
            for part in parts:
                if not part.exists():  # a rank with no readable film (or none at all) wrote none
                    continue
                with open(part, "rb") as f:
                    f.readline()  # the part's header
                    while block := f.read(1 << 20):
                        handle.write(block)

        atomic_write_with(out, write)
        for part in parts:
            part.unlink(missing_ok=True)
    env.barrier()
