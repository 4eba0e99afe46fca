"""predict benchmark: films/s of `pneumoscope predict` end to end (start-up included),
peak RSS of its process tree, and where the time goes (issue 26).

    python benchmarks/predict_bench.py RUN_DIR [--data DIR] [--films 624] [--originals 80]
        [--stream 20000] [--before-repo PATH] [--json results.json]

Every case is a fresh `python -m pneumoscope -q predict RUN_DIR ... --out CSV` process,
timed from its start to its exit; peak RSS is the largest sum over the process and its
children (decode workers), sampled from /proc every 50 ms.

* 224 px: the first --films JPEGs of --data (sorted), `--engine torch` (the old path's
  engine, streamed), the default (onnxruntime) with the engine export included (cold:
  RUN_DIR/engine.onnx removed first) and cached (warm), `--int8` (its first run includes
  the quantization and the validation check, whose verdict the JSON records; a refused
  int8 engine scores in fp32), `--workers 0`, and with --before-repo the CLI of
  another checkout (e.g. `git worktree add /tmp/before main` before this issue's merge),
  run the same way: the before -> after figure.
* Full-size originals: --originals of the films upsampled (bicubic) to 1,000-2,000 px a
  side and saved as JPEG (quality 92) in a temporary folder: the shared copy holds only
  224 px films, so these stand in for a hospital's originals (the output says so).
  Default, --reduced-decode, --engine torch.
* Stream: --stream films (the data's files repeated through symbolic links, one --files
  list) in one run, peak RSS, and the same list as runs of --chunk (1,000) films: the
  joined CSVs must equal the one run's.
* Breakdown: start-up (import + load + engine), decode alone (one process), model alone
  (onnxruntime batch --batch-size and torch batch 64, on decoded films).

Run it on a quiet machine; on a CPU with AVX-512/AMX, as the reference laptop has only
AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/predict_bench.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_224" / "train"


def films_of(data: Path, n: int) -> list[Path]:
    files = sorted(data.rglob("*.jpeg"))
    if not files:
        sys.exit(f"no JPEGs under {data}")
    return files[:n]


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_predict(run: Path, args: list[str], repo: Path = REPO) -> dict:
    """One `pneumoscope predict` process: wall seconds and peak tree RSS."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "pneumoscope", "-q", "predict", str(run), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak[0], 1), "stdout": out.strip()}


def case(name: str, n: int, result: dict) -> dict:
    result.update(case=name, films=n, films_per_s=round(n / result["wall_s"], 1))
    print(
        f"  {name}: {result['wall_s']:.1f} s, {result['films_per_s']:.1f} films/s, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return result


def list_file(folder: Path, files: list, name: str) -> Path:
    path = folder / name
    path.write_text("".join(f"{f}\n" for f in files))
    return path


def make_originals(films: list[Path], folder: Path, seed: int = 0) -> list[Path]:
    """Films upsampled to 1,000-2,000 px (bicubic) as JPEG, quality 92."""
    rng = np.random.default_rng(seed)
    out = []
    for f in films:
        width = int(rng.integers(1000, 2001))
        height = int(width * rng.uniform(0.8, 1.25))
        dest = folder / f"{f.stem}_{width}x{height}.jpeg"
        Image.open(f).convert("L").resize((width, height), Image.Resampling.BICUBIC).save(
            dest, "JPEG", quality=92
        )
        out.append(dest)
    return out


def breakdown(run: Path, films: list[Path], batch: int) -> dict:
    """Start-up, decode alone and model alone, in this process."""
    start = time.perf_counter()
    from pneumoscope.data.workers import decode_batch
    from pneumoscope.deploy.scoring import load_scorer
    from pneumoscope.inference import predict_class_probs

    scorer = load_scorer(run)  # the engine is cached by now
    startup = time.perf_counter() - start
    size = scorer.image_size
    start = time.perf_counter()
    _, images, _ = decode_batch([str(f) for f in films], size, False)
    decode = len(films) / (time.perf_counter() - start)
    rates = {}
    for name, fn in (
        ("onnxruntime", lambda x: scorer.predict_class_probs(x)),
        ("torch", lambda x: predict_class_probs(scorer.torch.model, x, batch_size=64)),
    ):
        fn(images[:batch])  # warm-up
        start, done = time.perf_counter(), 0
        for s in range(0, len(images), batch):
            fn(images[s : s + batch])
            done += len(images[s : s + batch])
        rates[name] = round(done / (time.perf_counter() - start), 1)
    return {
        "startup_s": round(startup, 2),
        "decode_films_per_s_1proc": round(decode, 1),
        "model_films_per_s": rates,
        "engine": scorer.runtime,
    }


def stream_case(run: Path, data: Path, n: int, tmp: Path, chunk: int = 1000) -> list[dict]:
    """n films in one run, and as n/chunk runs of chunk films: same CSV."""
    source = sorted(data.rglob("*.jpeg"))
    links = tmp / "stream"
    links.mkdir()
    paths = []
    for i in range(n):  # distinct paths: the archive's films, repeated
        link = links / f"{i // chunk:03d}" / f"film{i:06d}.jpeg"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(source[i % len(source)])
        paths.append(link)
    whole = tmp / "whole.csv"
    results = [
        case(
            f"stream {n} films, one run",
            n,
            run_predict(
                run, ["--files", str(list_file(tmp, paths, "all.txt")), "--out", str(whole)]
            ),
        )
    ]
    parts, start = [], time.perf_counter()
    for k in range(0, n, chunk):
        part = tmp / f"part{k // chunk:03d}.csv"
        run_predict(
            run,
            [
                "--files",
                str(list_file(tmp, paths[k : k + chunk], f"part{k}.txt")),
                "--out",
                str(part),
            ],
        )
        parts.append(part)
    wall = time.perf_counter() - start
    joined = whole.read_text().splitlines()[:1] + [
        line for p in parts for line in p.read_text().splitlines()[1:]
    ]
    same = joined == whole.read_text().splitlines()
    print(
        f"  {len(parts)} runs of {chunk}: {wall:.1f} s; joined CSV equals the one run's: {same}",
        flush=True,
    )
    results.append(
        {
            "case": f"{len(parts)} runs of {chunk}",
            "films": n,
            "wall_s": round(wall, 1),
            "same_csv": same,
        }
    )
    if not same:
        sys.exit("the streamed CSV differs from the joined runs' CSV")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--data", default=str(DEFAULT_DATA), help="folder of 224 px JPEGs (searched recursively)"
    )
    ap.add_argument("--films", type=int, default=624, help="224 px films of the end-to-end case")
    ap.add_argument(
        "--originals", type=int, default=80, help="simulated full-size originals (0: skip)"
    )
    ap.add_argument(
        "--stream", type=int, default=20000, help="films of the streaming case (0: skip)"
    )
    ap.add_argument(
        "--chunk",
        type=int,
        default=1000,
        help="films per run of the streaming case's separate runs",
    )
    ap.add_argument(
        "--before-repo", help="another checkout whose `pneumoscope predict` is the 'before' row"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    run, data = Path(args.run_dir), Path(args.data)
    films = films_of(data, args.films)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}, "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        },
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="predict_bench_") as tmp_name:
        tmp = Path(tmp_name)
        listing = str(list_file(tmp, films, "films.txt"))
        print(f"{len(films)} films of 224 px from {data}:")
        cases = results["cases"]
        if args.before_repo:
            # the old CLI has no --files: the films as arguments
            before = [*map(str, films), "--out", str(tmp / "before.csv")]
            cases.append(
                case(
                    "before (--before-repo)",
                    len(films),
                    run_predict(run, before, Path(args.before_repo)),
                )
            )
        cases.append(
            case(
                "--engine torch",
                len(films),
                run_predict(
                    run, ["--files", listing, "--engine", "torch", "--out", str(tmp / "torch.csv")]
                ),
            )
        )
        for stale in (
            run / "engine.onnx",
            run / "engine.onnx.json",
            run / "engine.int8.onnx",
            run / "engine.int8.onnx.json",
            run / "engine.int8.check.json",
        ):
            stale.unlink(missing_ok=True)
        cases.append(
            case(
                "default, engine exported (cold)",
                len(films),
                run_predict(run, ["--files", listing, "--out", str(tmp / "cold.csv")]),
            )
        )
        cases.append(
            case(
                "default, engine cached",
                len(films),
                run_predict(run, ["--files", listing, "--out", str(tmp / "warm.csv")]),
            )
        )
        cases.append(
            case(
                "--int8 (fp32 where refused: see engine.int8.check.json)",
                len(films),
                run_predict(run, ["--files", listing, "--int8", "--out", str(tmp / "int8.csv")]),
            )
        )
        cases[-1]["int8_check"] = json.loads((run / "engine.int8.check.json").read_text())
        cases.append(
            case(
                "default, engine cached, --workers 0",
                len(films),
                run_predict(
                    run, ["--files", listing, "--workers", "0", "--out", str(tmp / "w0.csv")]
                ),
            )
        )
        diff = max_diff(tmp / "torch.csv", tmp / "warm.csv")
        print(f"  max |p_onnxruntime - p_torch| over the CSVs: {diff:.2e}")
        results["max_abs_diff_vs_torch"] = diff
        if args.originals:
            folder = tmp / "originals"
            folder.mkdir()
            originals = make_originals(films[: args.originals], folder)
            print(
                f"{len(originals)} simulated full-size originals (224 px films upsampled to 1,000-2,000 px, JPEG q92):"
            )
            for name, extra in (
                ("default", []),
                ("--reduced-decode", ["--reduced-decode"]),
                ("--engine torch", ["--engine", "torch"]),
            ):
                cases.append(
                    case(
                        f"originals, {name}",
                        len(originals),
                        run_predict(run, [str(folder), "--out", str(tmp / "orig.csv"), *extra]),
                    )
                )
        print("where the time goes (in one process, engine cached):")
        results["breakdown"] = breakdown(run, films, args.batch_size)
        print("  " + json.dumps(results["breakdown"]))
        if args.stream:
            print(f"streaming {args.stream} films:")
            cases += stream_case(run, data, args.stream, tmp, args.chunk)
    for c in results["cases"]:
        c.pop("stdout", None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def max_diff(a: Path, b: Path) -> float:
    import csv

    def probs(path):
        with open(path, newline="") as handle:
            return {r["path"]: float(r["p_pneumonia"]) for r in csv.DictReader(handle)}

    pa, pb = probs(a), probs(b)
    if pa.keys() != pb.keys():
        sys.exit(f"{a} and {b} score other files")
    return max(abs(pa[k] - pb[k]) for k in pa)


if __name__ == "__main__":
    raise SystemExit(main())
