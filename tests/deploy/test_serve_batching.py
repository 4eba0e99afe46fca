"""serve's scoring: the fast engine by default, equal to torch within 1e-4, and films of
requests that wait together scored in one model call."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.inference import Predictor
from pneumoscope.serve.engine import Batcher, InferenceEngine

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def run(small_run_dir, tmp_path_factory) -> Path:
    return Path(shutil.copytree(small_run_dir, tmp_path_factory.mktemp("serve_batching") / "run"))


@pytest.fixture(scope="module")
def films() -> list[Path]:
    return sorted(SAMPLE.rglob("*.jpeg"))[::40][:8]


class GatedScorer:
    """The run's torch predictor, whose first call waits for `release`; records batch sizes."""

    def __init__(self, predictor):
        self.predictor, self.sizes = predictor, []
        self.entered, self.release = threading.Event(), threading.Event()

    def predict_class_probs(self, images):
        self.sizes.append(len(images))
        self.entered.set()
        assert self.release.wait(60)
        return self.predictor.predict_class_probs(images)


def wait_for(condition, seconds=60.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_films_waiting_together_are_scored_in_one_call(run, films):
    predictor = Predictor.from_run(run, device="cpu")
    images = np.stack([predictor.load(f) for f in films[:6]])
    gated = GatedScorer(predictor)
    batcher = Batcher(gated)
    results = [None] * len(images)

    def score(i):
        results[i] = batcher.class_probs(images[i])

    first = threading.Thread(target=score, args=(0,))
    first.start()
    assert gated.entered.wait(60)  # the model is busy with film 0 ...
    others = [threading.Thread(target=score, args=(i,)) for i in range(1, len(images))]
    for t in others:
        t.start()
    wait_for(lambda: batcher.waiting.qsize() == len(images) - 1)  # ... while 5 more arrive
    gated.release.set()
    for t in [first, *others]:
        t.join(60)
    assert gated.sizes == [1, len(images) - 1]
    np.testing.assert_allclose(np.stack(results), predictor.predict_class_probs(images), atol=1e-6)


def test_an_error_reaches_every_waiting_request(run, films):
    class Broken:
        def predict_class_probs(self, images):
            raise RuntimeError("scorer failed")

    batcher = Batcher(Broken())
    with pytest.raises(RuntimeError, match="scorer failed"):
        batcher.class_probs(np.zeros((64, 64), np.uint8))
    with pytest.raises(RuntimeError, match="scorer failed"):  # the thread lives on
        batcher.class_probs(np.zeros((64, 64), np.uint8))


def test_serve_scores_on_onnxruntime_equal_to_torch(run, films):
    engine = InferenceEngine(run)
    assert engine.runtime == "onnxruntime" and engine.info["runtime"] == "onnxruntime"
    torch_engine = InferenceEngine(run, engine="torch")
    assert torch_engine.runtime == "torch"
    for f in films:
        got = engine.predict(f.read_bytes(), f.name)
        want = torch_engine.predict(f.read_bytes(), f.name)
        assert abs(got["p_pneumonia"] - want["p_pneumonia"]) <= 1e-4
        assert got["label"] == want["label"] or abs(want["p_pneumonia"] - want["threshold"]) < 1e-4
