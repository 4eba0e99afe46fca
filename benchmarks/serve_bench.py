"""Serving benchmark: POST /v1/predict latency and batch images/s, torch vs ONNX.

    python benchmarks/serve_bench.py RUN_DIR [--onnx RUN_DIR/model.onnx] [--requests 60]
        [--clients 20] [--client-requests 10]

* Latency: a real uvicorn server on 127.0.0.1 (in this process, one thread) per runtime
  — ``create_app(run)`` and ``create_app(run, onnx_path=...)``, i.e. ``pneumoscope serve``
  with and without ``--onnx`` — and one httpx client sending real shared JPEGs one at a
  time (keep-alive). The time covers HTTP, multipart parsing, decode, resize and the
  model; p50/p95 over --requests after --warmup requests. Also the Grad-CAM path
  (``?heatmap=true``, torch) for reference.
* Concurrent clients (issue 26): --clients threads, each with its own keep-alive httpx
  client, send --client-requests films each at once against one server: p50/p95 latency,
  films/s over the burst and the mean batch the server's Batcher scored (requests that
  wait together share a model call), for `pneumoscope serve` by default (onnxruntime
  engine) and with `--engine torch`.
* Batch throughput: in-process, already decoded images (N, S, S) through
  ``Predictor.predict_images`` (torch) and ``OnnxPredictor.predict_images``
  (onnxruntime), batch size --batch, best of --repeats.

Exports RUN_DIR to ONNX first when --onnx is missing. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from pneumoscope.deploy.onnx_predictor import OnnxPredictor
from pneumoscope.inference import Predictor, predict_probs
from pneumoscope.serve import create_app
from pneumoscope.serve.background import BackgroundServer
from pneumoscope.serve.engine import InferenceEngine

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray_224"


def shared_images(data: Path, n: int) -> list[Path]:
    files = sorted((data / "val").rglob("*.jpeg")) + sorted((data / "train").rglob("*.jpeg"))
    if not files:
        sys.exit(f"no JPEGs under {data}/val or {data}/train")
    step = max(1, len(files) // n)
    return files[::step][:n]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_ms(
    app, files: list[Path], requests: int, warmup: int, heatmap: bool = False
) -> list[float]:
    payloads = [(f.name, f.read_bytes()) for f in files]
    times = []
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for i in range(warmup + requests):
            name, data = payloads[i % len(payloads)]
            start = time.perf_counter()
            r = client.post(
                "/v1/predict",
                files={"file": (name, data)},
                params={"heatmap": "true"} if heatmap else None,
            )
            elapsed = (time.perf_counter() - start) * 1000
            r.raise_for_status()
            if i >= warmup:
                times.append(elapsed)
    return times


def concurrent(
    run: Path, engine: InferenceEngine, files: list[Path], clients: int, per_client: int
) -> dict:
    """--clients threads posting at once against one server (see the module docstring)."""
    payloads = [(f.name, f.read_bytes()) for f in files]
    times, errors = [], []
    app = create_app(run, engine=engine, rate_limit=None)  # 20 clients at once: no 429

    def client_loop(k: int, url: str, start: threading.Barrier) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            client.get("/healthz")  # connect before the burst
            start.wait()
            for i in range(per_client):
                name, data = payloads[(k * per_client + i) % len(payloads)]
                t0 = time.perf_counter()
                r = client.post("/v1/predict", files={"file": (name, data)})
                times.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors.append(r.status_code)

    with BackgroundServer(app) as server:
        start = threading.Barrier(clients + 1)
        threads = [
            threading.Thread(target=client_loop, args=(k, server.url, start))
            for k in range(clients)
        ]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"{len(errors)} failed requests: {errors[:5]}")
    sizes = engine.batcher.batch_sizes
    return {
        "p50": percentile(times, 50),
        "p95": percentile(times, 95),
        "films_per_s": len(times) / wall,
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "requests": len(times),
    }


def images_per_s(predict, images: np.ndarray, repeats: int) -> float:
    predict(images[: min(len(images), 8)])  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--onnx", help="ONNX export of RUN_DIR (default RUN_DIR/model.onnx, exported if missing)"
    )
    ap.add_argument(
        "--data", default=str(DEFAULT_DATA), help="DATA_ROOT with val/ and train/ JPEGs"
    )
    ap.add_argument("--requests", type=int, default=60, help="timed requests per runtime")
    ap.add_argument(
        "--heatmap-requests", type=int, default=15, help="timed ?heatmap=true requests (torch)"
    )
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests first")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the throughput test")
    ap.add_argument("--batch-images", type=int, default=128, help="images in the throughput test")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: best of this many passes")
    ap.add_argument(
        "--clients", type=int, default=20, help="concurrent clients (0: skip that part)"
    )
    ap.add_argument(
        "--client-requests", type=int, default=10, help="requests per concurrent client"
    )
    args = ap.parse_args()

    run = Path(args.run_dir)
    onnx_path = Path(args.onnx) if args.onnx else run / "model.onnx"
    if not onnx_path.exists():
        from pneumoscope.deploy.export import export_onnx

        print(f"exporting {run} -> {onnx_path}", file=sys.stderr)
        export_onnx(run, onnx_path)

    torch_pred = Predictor.from_run(run, device="cpu")
    onnx_pred = OnnxPredictor.from_file(onnx_path, run_dir=run)
    size = torch_pred.image_size
    files = shared_images(Path(args.data), max(args.batch_images, 32))

    rows = []
    unlimited = {"rate_limit": None}  # a latency benchmark, not a stranger: no 429 after --requests
    torch_engine = InferenceEngine(run, device="cpu", engine="torch")
    fast_engine = InferenceEngine(run, device="cpu")  # the default: the cached onnxruntime engine
    for name, app in (
        ("torch (--engine torch)", create_app(run, engine=torch_engine, **unlimited)),
        (
            f"default ({fast_engine.runtime} engine)",
            create_app(run, engine=fast_engine, **unlimited),
        ),
        (
            "onnxruntime (serve --onnx)",
            create_app(run, onnx_path=onnx_path, device="cpu", **unlimited),
        ),
    ):
        t = latency_ms(app, files[:32], args.requests, args.warmup)
        rows.append(
            (
                f"POST /v1/predict, {name}",
                f"{percentile(t, 50):.1f}",
                f"{percentile(t, 95):.1f}",
                len(t),
            )
        )
    t = latency_ms(
        create_app(run, engine=torch_engine, **unlimited),
        files[:32],
        args.heatmap_requests,
        2,
        heatmap=True,
    )
    rows.append(
        (
            "POST /v1/predict?heatmap=true (Grad-CAM), torch",
            f"{percentile(t, 50):.1f}",
            f"{percentile(t, 95):.1f}",
            len(t),
        )
    )

    images = np.stack([torch_pred.load(f) for f in files[: args.batch_images]])
    tp_torch = images_per_s(
        lambda x: predict_probs(torch_pred.model, x, batch_size=args.batch), images, args.repeats
    )
    tp_onnx = images_per_s(
        lambda x: onnx_pred.predict_images(x, batch_size=args.batch), images, args.repeats
    )

    print(f"\nrun: {run}  backbone: {torch_pred.config.get('backbone')}  input {size}x{size}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {__import__('onnxruntime').__version__}, python {platform.python_version()}, "
        f"load average at the end {os.getloadavg()[0]:.1f} (shared machine: other jobs add noise)\n"
    )
    print("| single image (HTTP, sequential) | p50 ms | p95 ms | requests |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    if args.clients:
        print(
            f"\n| {args.clients} concurrent clients x {args.client_requests} "
            "requests | p50 ms | p95 ms | films/s | mean batch |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, engine in (
            ("torch (--engine torch)", InferenceEngine(run, device="cpu", engine="torch")),
            ("default", InferenceEngine(run, device="cpu")),
        ):
            c = concurrent(run, engine, files, args.clients, args.client_requests)
            print(
                f"| {name} ({engine.runtime}) | {c['p50']:.1f} | {c['p95']:.1f} | {c['films_per_s']:.1f} | "
                f"{c['mean_batch']:.1f} |",
                flush=True,
            )
    print(f"\n| batch inference, {len(images)} decoded images, batch {args.batch} | images/s |")
    print("|---|---:|")
    print(f"| torch | {tp_torch:.1f} |")
    print(f"| onnxruntime | {tp_onnx:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
