"""The model behind the web app: loaded once, shared by every request, thread-safe.

Requests run in worker threads (never on the event loop). Decoding runs in parallel
(at most DECODE_SLOTS at once, to bound memory); the decoded films go to one scoring
thread (Batcher) that scores every film waiting when it is free in one batch: requests
that arrive together share a model call, and a lone request waits for no one. Scoring
takes the fast path of predict (pneumoscope.deploy.scoring: onnxruntime where it applies, the
run's cached export checked against torch; --engine torch forces torch). Grad-CAM runs
on the torch model under its own module lock (pneumoscope.report.gradcam).
"""

from __future__ import annotations

import base64
import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from pneumoscope.data.sources import png_bytes
from pneumoscope.deploy.scoring import fast_scorer
from pneumoscope.inference import Predictor
from pneumoscope.report.gradcam import gradcam_heatmap, overlay_heatmap
from pneumoscope.tasks import BINARY, KEYS, bv_threshold_of, p_pneumonia, prediction_rows

# Decodes that may run at once: bounds the server's memory under a burst of big images.
DECODE_SLOTS = max(2, min(4, os.cpu_count() or 2))
# Films per model call at most: a burst beyond it is scored in several calls.
MAX_BATCH = 32


class Batcher:
    """One daemon thread that owns the scorer: `class_probs(image)` queues a film and
    waits; the thread takes every film queued when it is free (up to MAX_BATCH) and
    scores them in one call."""

    def __init__(self, scorer, max_batch: int = MAX_BATCH):
        self.scorer, self.max_batch = scorer, max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # the last few, for tests and benchmarks
        threading.Thread(target=self._run, name="pneumoscope-batcher", daemon=True).start()

    def class_probs(self, image: np.ndarray) -> np.ndarray:
        """(C,) class probabilities of one uint8 (S, S) film."""
        done: Future = Future()
        self.waiting.put((image, done))
        return done.result()

    def _run(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            try:
                probs = self.scorer.predict_class_probs(np.stack([image for image, _ in batch]))
            except Exception as err:  # noqa: BLE001 - each waiting request gets the error
                for _, done in batch:
                    done.set_exception(err)
                continue
            for row, (_, done) in zip(probs, batch):
                done.set_result(row)


class InferenceEngine:
    def __init__(
        self,
        run_dir: str | Path,
        onnx_path: str | Path | None = None,
        threshold_rule: str | None = None,
        device: str | None = None,
        engine: str | None = None,
    ):
        # The torch model always loads: Grad-CAM needs its gradients even when the
        # probability comes from onnxruntime.
        self.torch = Predictor.from_run(run_dir, device=device)
        if onnx_path:
            from pneumoscope.deploy.onnx_predictor import OnnxPredictor

            self.scorer = OnnxPredictor.from_file(onnx_path, run_dir=run_dir)
        else:
            self.scorer = fast_scorer(run_dir, self.torch, engine)
        if hasattr(
            self.scorer, "check_now"
        ):  # the engine's check at start-up, not on a user's film
            self.scorer.check_now()
        self.runtime = self.scorer.runtime
        self.batcher = Batcher(self.scorer)
        self.threshold_rule = threshold_rule or self.torch.thresholds.get("default", "youden")
        self.threshold = self.scorer.threshold_for(threshold_rule)
        self.bv_threshold = bv_threshold_of(self.scorer.thresholds)
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.info = {
            "backbone": self.torch.config.get("backbone"),
            "image_size": self.torch.image_size,
            "run": Path(run_dir).resolve().name,
            "runtime": self.runtime,
            "threshold_rule": self.threshold_rule,
        }

    @property
    def image_size(self) -> int:
        return self.torch.image_size

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """Upload bytes -> the model's uint8 (S, S) input; ImageDecodeError if unreadable.

        At most DECODE_SLOTS at once: a small upload can declare up to MAX_PIXELS and
        take hundreds of MB to decode, and the server runs up to 40 request threads."""
        with self._decode_slots:
            return self.scorer.load(data, name=name)

    def class_probs(self, image: np.ndarray) -> np.ndarray:
        """(1, C) class probabilities of one image (C = 3 for a three-class run), scored
        with the films of other requests waiting at the same time."""
        return self.batcher.class_probs(image)[None]

    def probability(self, image: np.ndarray) -> float:
        return float(p_pneumonia(self.class_probs(image))[0])

    def overlay_png(self, image: np.ndarray) -> tuple[bytes, bool]:
        """Grad-CAM overlay (PNG) and whether the map is empty (no region raised the score)."""
        heat = gradcam_heatmap(self.torch.model, image)
        return png_bytes(overlay_heatmap(image, heat)), not bool(heat.max() > 0)

    def predict(self, data: bytes, name: str, heatmap: bool = False) -> dict:
        """The API answer for one upload (runs in a worker thread)."""
        image = self.decode(data, name)
        task = self.torch.task
        row = prediction_rows(task, self.class_probs(image), self.threshold, self.bv_threshold)[0]
        result = {
            "p_pneumonia": row["p_pneumonia"],
            "label": row["label"],
            "threshold": self.threshold,
            "threshold_rule": self.threshold_rule,
            "model": self.info,
        }
        if task != BINARY:  # three-class: the three probabilities and the subtype threshold
            result["probabilities"] = {k: row[f"p_{k}"] for k in KEYS}
            result["bacterial_vs_viral_threshold"] = self.bv_threshold
        if heatmap:
            result["input_png"] = _b64(png_bytes(image))
            overlay, empty = self.overlay_png(image)
            result["heatmap_png"], result["heatmap_empty"] = _b64(overlay), empty
        return result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
