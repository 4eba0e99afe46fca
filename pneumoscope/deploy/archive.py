"""`pneumoscope predict` over an archive: stream, write as it goes, resume, shard.

``predict_archive`` lists the files (folders searched, or ``--files LIST.txt``), decodes
them in worker processes (pneumoscope.data.workers) while the model scores the previous
batch (pneumoscope.deploy.scoring: onnxruntime where it applies), and appends each batch's rows
to the CSV with a flush: memory stays flat, and a killed run loses at most the batch it
was on. ``--resume`` keeps the rows the CSV already holds and scores the rest.

Under ``torchrun --nproc-per-node N -m pneumoscope predict ... --out OUT`` each rank
scores a contiguous shard of the sorted list into ``OUT.rankR-of-N.part`` and rank 0 joins
the parts into OUT in the list's order: the same rows in the same order as one process.
``--resume`` under torchrun, or in one process after one, keeps the rows OUT and every
part already hold, whatever the number of processes that wrote them. The parts live
beside OUT: across machines, OUT's folder must be shared (rank 0 reads every part).
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pneumoscope.data.cache import report_failures
from pneumoscope.data.workers import decoded_batches, default_workers
from pneumoscope.errors import DataError, MissingFileError, OptionError, UserError
from pneumoscope.fsio import CsvWriter
from pneumoscope.tasks import (
    bv_threshold_of,
    prediction_cells,
    prediction_columns,
    prediction_rows,
)

log = logging.getLogger(__name__)

# Films per model call: onnxruntime's rate on the 2-core VM levels off from 32 (benchmarks/predict_bench.py).
DEFAULT_BATCH = 32


@dataclass
class PredictSummary:
    scored: int = 0  # rows written by this run
    readable: int = 0  # films that decoded (scored, or not under --strict)
    resumed: int = 0  # rows the CSV held already (--resume)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    engine: str = "torch"


def list_files(paths: list[str | Path], files_list: str | Path | None = None) -> list[str]:
    """The files to score, in a fixed order: each path as given (a folder: its images,
    searched recursively, sorted), then the lines of `files_list` (blank lines and #
    comments skipped), each file once. A path that does not exist, or nothing to score, is
    an error."""
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
    return once_each(files)


def once_each(files: list[str]) -> list[str]:
    """The files in order, a file named twice (by a folder and the list, or twice in the
    list) kept at its first place: one row a file, so a resumed run writes the rows an
    uninterrupted one does."""
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        log.warning(
            "%d file(s) named more than once: each is scored once", len(files) - len(unique)
        )
    return unique


def read_files_list(files_list: str | Path) -> list[str]:
    """One path a line; relative paths are taken from the current folder."""
    try:
        # "\n" alone ends a line (newline="": no \r translated): splitlines would also cut
        # at \u2028 or \x1c, which a name may hold
        with open(files_list, encoding="utf-8-sig", newline="") as handle:
            lines = [line.removesuffix("\r") for line in handle.read().split("\n")]
    except FileNotFoundError as err:
        raise MissingFileError(f"{files_list}: no such file list") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{files_list}: cannot read the file list ({err})") from err
    # not str.strip: \x1c or \u2028 are "spaces" too
    paths = [line.strip(" \t") for line in lines]
    return [path for path in paths if path and not path.startswith("#")]


def shard(files: list[str], rank: int, world: int) -> list[str]:
    """Rank's contiguous share of the list (sizes differ by at most one)."""
    n = len(files)
    return files[rank * n // world : (rank + 1) * n // world]


def part_path(out: Path, rank: int, world: int) -> Path:
    """A rank's part of OUT under torchrun (OUT itself in one process). The world size is in
    the name: a resume with another number of processes cannot take another shard's part
    for its own."""
    return out if world == 1 else out.with_name(f"{out.name}.rank{rank}-of-{world}.part")


def parts_of(out: Path) -> list[Path]:
    """Every rank's part of OUT on disk, whatever the number of processes that wrote it."""
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.rank*-of-*.part"))


def rows_done(out: Path, header: list[str]) -> set[str]:
    """--resume: the paths OUT and every part of it already hold (torn last lines cut)."""
    done = read_done(out, header)
    for part in parts_of(out):
        done |= read_done(part, header)
    return done


def read_done(csv_path: Path, header: list[str]) -> set[str]:
    """The paths a CSV already holds. A last line cut off by a kill is dropped (the file
    is truncated to its last complete row); another header is refused."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return set()
    data = csv_path.read_bytes()
    complete = data[: complete_length(data)]
    if len(complete) != len(data):
        with open(csv_path, "r+b") as handle:
            handle.truncate(len(complete))
    # csv's own reader over the text (not splitlines, which also splits at \r, \x1c or
    # \u2028: characters a quoted path may hold)
    rows = list(csv.reader(io.StringIO(complete.decode("utf-8"), newline="")))
    if rows and rows[0] != header:
        raise DataError(
            f"{csv_path}: --resume found another table (columns {','.join(rows[0])}; "
            f"this run writes {','.join(header)})"
        )
    return {row[0] for row in rows[1:] if row}


def complete_length(data: bytes) -> int:
    """The length of the complete rows of CSV bytes: up to the last line end outside
    quotes (a quoted path may hold a line end; a kill may cut a row anywhere). Our writer
    quotes every field that holds a quote, so the quotes before a line end are even there."""
    end = len(data)
    while (cut := data.rfind(b"\n", 0, end)) >= 0:
        if data.count(b'"', 0, cut) % 2 == 0:
            return cut + 1
        end = cut
    return 0


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
        self.writer = CsvWriter(self.handle)
        if fresh:
            self.writer.writerow(header)
            self.handle.flush()

    def write(self, rows: list[dict]) -> None:
        self.writer.writerows(prediction_cells(r, self.header) for r in rows)
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
    out = Path(out) if out is not None else None
    target = part_path(out, env.rank, env.world_size) if out is not None else None
    # rank 0 alone reads, repairs or clears what an earlier run left (OUT, every part); the
    # broadcast hands the others its answer and holds them until it is done
    done, join, problem = set(), env.world_size > 1, None
    if out is not None and env.is_main:
        try:
            if resume:
                done = rows_done(out, header)
                join = join or bool(parts_of(out))  # one process resuming a torchrun's parts
            else:  # a new run: nothing of an earlier one may be taken for this one's rows
                for stale in parts_of(out) + ([out] if env.world_size > 1 else []):
                    stale.unlink(missing_ok=True)
        except (UserError, OSError) as err:
            if env.world_size == 1:
                raise
            problem = f"{out}: {err}"
    # every rank the same answer, or the same error (none may wait for a rank that left)
    done, join, problem = env.broadcast((done, join, problem))
    if problem:
        raise DataError(problem)
    # the films still to score, shared out evenly (the join puts them in the list's order)
    mine = shard([f for f in files if f not in done], env.rank, env.world_size)
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
    if env.world_size > 1:
        settle_ranks(summary, env, target, strict, resume, files[0])
    summary.resumed = len(done.intersection(files))
    if join:
        join_parts(out, env, header, files, resume)
    return summary


def settle_ranks(
    summary: PredictSummary, env, target: Path | None, strict: bool, resume: bool, first: str
) -> None:
    """Under torchrun: the whole run's counts on every rank, and what one process would
    decide on them decided by all ranks at once (a rank that raised alone would leave the
    others waiting): nothing readable → exit 2, --strict with any unreadable film → stop;
    each rank then removes its own part."""
    from pneumoscope.data.sources import require_some_readable

    scored, readable, failed = env.all_reduce_sum(
        [summary.scored, summary.readable, len(summary.failures)]
    )
    summary.scored, summary.readable = int(scored), int(readable)
    stop_strict = strict and failed > 0
    if (readable == 0 and not resume) or stop_strict:
        if target is not None and not resume:
            target.unlink(missing_ok=True)
        if readable == 0 and not resume:
            require_some_readable(0, summary.failures or [(first, "no rank could read a film")])
        report_failures(summary.failures, strict=True)
        raise DataError(
            f"--strict: {int(failed)} unreadable file(s) on other ranks; nothing joined"
        )
    report_failures(summary.failures, strict=False)


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
    summary.readable = readable
    # every file unreadable: an error, not an empty CSV
    nothing = whole and readable == 0 and not append
    if whole and (nothing or (strict and summary.failures)) and target is not None and not append:
        target.unlink(missing_ok=True)
    if nothing:
        from pneumoscope.data.sources import require_some_readable

        require_some_readable(0, summary.failures)
    if whole:  # under torchrun settle_ranks reports, for all ranks at once
        report_failures(summary.failures, strict)
    return summary


def join_parts(out: Path, env, header: list[str], files: list[str], resume: bool = False) -> None:
    """Rank 0 writes OUT (atomically) and removes the parts. A new run: the parts of this
    run's ranks in rank order, streamed (contiguous shards: the list's order). --resume:
    every part's rows, then OUT's for the paths no part holds, in the order of `files`
    (rows of paths not in `files`, from an earlier list, after them), held in memory."""
    from pneumoscope.fsio import atomic_write_csv, atomic_write_with

    env.barrier()
    mine = [part_path(out, r, env.world_size) for r in range(env.world_size)]
    missing = [p.name for p in mine if env.world_size > 1 and not p.exists()] if env.is_main else []
    if env.world_size > 1:  # every rank leaves with the same error, none waits for rank 0
        missing = env.broadcast(missing)
    if missing:
        raise DataError(
            f"{out}: no {', '.join(missing)}: every rank writes its part beside OUT and rank "
            "0 joins them, so across machines OUT's folder must be one shared folder"
        )
    if env.is_main:
        parts = parts_of(out)
        if resume:
            sources = [*parts, out] if env.world_size > 1 else [out, *parts]
            rows = joined_rows(sources, files)
            atomic_write_csv(out, header, rows)
        else:
            atomic_write_with(out, lambda handle: concatenate(handle, header, mine))
        for part in parts:
            part.unlink(missing_ok=True)
    env.barrier()


def joined_rows(sources: list[Path], files: list[str]) -> list[list[str]]:
    """The rows of `sources` (the first holding a path wins), in the order of `files`."""
    rows: dict[str, list[str]] = {}
    for source in sources:
        if source.exists():
            with open(source, newline="", encoding="utf-8") as handle:
                for row in list(csv.reader(handle))[1:]:
                    if row:
                        rows.setdefault(row[0], row)
    place = {path: i for i, path in enumerate(files)}
    return sorted(rows.values(), key=lambda row: place.get(row[0], len(place)))


def concatenate(handle, header: list[str], parts: list[Path]) -> None:
    """The header, then each part's rows (its own header skipped), block by block."""
    handle.write((",".join(header) + "\n").encode("utf-8"))
    for part in parts:
        with open(part, "rb") as f:
            f.readline()  # the part's header
            while block := f.read(1 << 20):
                handle.write(block)
