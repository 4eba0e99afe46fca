"""Grad-CAM: heatmaps of the right shape and range, and a shared model left as it was found
(web server use: no hooks, modes, requires_grad or grads changed; threads)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.data.sources import png_bytes
from pneumoscope.inference import Predictor
from pneumoscope.report.gradcam import gradcam_heatmap, gradcam_heatmaps, overlay_heatmap


@pytest.fixture(scope="module")
def predictor(report_run) -> Predictor:
    return Predictor.from_run(report_run, device="cpu")


@pytest.fixture(scope="module")
def pneumonia_image(predictor, report_split) -> np.ndarray:
    """The test image the trained model finds most like pneumonia."""
    images = np.stack(
        [predictor.load(p) for p in sorted((report_split / "PNEUMONIA").glob("*.jpeg"))]
    )
    return images[int(np.argmax(predictor.predict_images(images)))]


def hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_heatmap_shape_range_and_not_constant(predictor, pneumonia_image):
    heat = gradcam_heatmap(predictor.model, pneumonia_image)
    assert heat.shape == pneumonia_image.shape == (64, 64)
    assert heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    assert heat.max() - heat.min() > 0.5  # normalised per image: a real map spans the range


def test_model_left_as_found(predictor, pneumonia_image):
    model = predictor.model
    reference = gradcam_heatmap(model, pneumonia_image)
    # A mixed state a server would never choose but must survive: training mode with the
    # lower stages frozen (kept in eval mode), grads off on one stage, a stale grad on another.
    model.freeze_stages(3)
    model.train()
    stale = torch.ones_like(model.head.bias)
    model.head.bias.grad = stale
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    hooks = hook_count(model)
    try:
        heat = gradcam_heatmap(model, pneumonia_image)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(a is b for a, b in zip((p.grad for p in model.parameters()), grads))
        assert hook_count(model) == hooks
        np.testing.assert_allclose(heat, reference, atol=1e-5)  # computed in eval mode regardless
    finally:
        model.head.bias.grad = None
        model.freeze_stages(0)
        model.eval()


def test_frozen_served_model_and_inference_mode(predictor, pneumonia_image):
    model = predictor.model
    reference = gradcam_heatmap(model, pneumonia_image)
    model.requires_grad_(False)
    try:
        with torch.inference_mode():
            heat = gradcam_heatmap(model, pneumonia_image)
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)
    np.testing.assert_allclose(heat, reference, atol=1e-5)


def test_threads_get_their_own_heatmaps(predictor, report_split):
    """Several threads explain different images while another predicts with the same model."""
    paths = sorted(report_split.rglob("*.jpeg"))[:6]
    images = [predictor.load(p) for p in paths]
    serial = [gradcam_heatmap(predictor.model, im) for im in images]
    results, failures = [None] * len(images), []
    stop = threading.Event()

    def explain(i):
        try:
            results[i] = gradcam_heatmap(predictor.model, images[i])
        except Exception as err:  # surfaced below
            failures.append(err)

    def predict_loop():
        batch = np.stack(images)
        while not stop.is_set():
            predictor.predict_images(batch)

    predicting = threading.Thread(target=predict_loop)
    predicting.start()
    workers = [threading.Thread(target=explain, args=(i,)) for i in range(len(images))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    predicting.join()
    assert not failures, failures
    for got, want in zip(results, serial):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert hook_count(predictor.model) == 0
    # The batch form gives each image its own map, as one-by-one calls do.
    np.testing.assert_allclose(
        gradcam_heatmaps(predictor.model, np.stack(images)), np.stack(serial), atol=1e-4
    )


def test_overlay_and_png(pneumonia_image):
    heat = np.linspace(0, 1, pneumonia_image.size, dtype=np.float32).reshape(pneumonia_image.shape)
    rgb = overlay_heatmap(pneumonia_image, heat)
    assert rgb.shape == (*pneumonia_image.shape, 3) and rgb.dtype == np.uint8
    plain = overlay_heatmap(pneumonia_image, heat, alpha=0.0)
    assert np.array_equal(plain, np.repeat(pneumonia_image[..., None], 3, axis=2))
    hot, cold = rgb[-1, -1].astype(int), rgb[0, 0].astype(int)  # jet: 1 -> red, 0 -> blue
    assert hot[0] > hot[2] and cold[2] > cold[0]
    with Image.open(io.BytesIO(png_bytes(rgb))) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), rgb)


def test_bad_arguments(predictor, pneumonia_image):
    with pytest.raises(ValueError, match="uint8"):
        gradcam_heatmap(predictor.model, pneumonia_image.astype(np.float32))
    with pytest.raises(ValueError, match="same"):
        overlay_heatmap(pneumonia_image, np.zeros((8, 8), np.float32))
