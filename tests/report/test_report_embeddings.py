"""Embeddings and their 2-D maps, calibration numbers and the Grad-CAM gallery's picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscope.inference import Predictor
from pneumoscope.report.build import pick_examples
from pneumoscope.report.embeddings import embed_and_predict, extract_embeddings, tsne_2d, umap_2d
from pneumoscope.report.gradcam import gradcam_heatmap
from pneumoscope.report.reliability import reliability


@pytest.fixture(scope="module")
def embeddings(report_run, report_split) -> np.ndarray:
    predictor = Predictor.from_run(report_run, device="cpu")
    images = np.stack([predictor.load(p) for p in sorted(report_split.rglob("*.jpeg"))])
    emb = extract_embeddings(predictor.model, images, batch_size=10)
    assert emb.shape == (len(images), predictor.model.feature_dim) and np.isfinite(emb).all()
    return emb


def test_tsne_one_2d_point_per_image_and_seeded(embeddings):
    points = tsne_2d(embeddings, seed=0, perplexity=5)
    assert points.shape == (len(embeddings), 2) and np.isfinite(points).all()
    np.testing.assert_array_equal(points, tsne_2d(embeddings, seed=0, perplexity=5))


@pytest.mark.slow  # numba compiles UMAP on first use
def test_umap_one_2d_point_per_image_and_seeded(embeddings):
    points = umap_2d(embeddings, seed=0)
    assert points.shape == (len(embeddings), 2) and np.isfinite(points).all()
    np.testing.assert_allclose(points, umap_2d(embeddings, seed=0), atol=1e-5)


def test_maps_refuse_too_few_points(embeddings):
    with pytest.raises(ValueError, match="at least 4"):
        tsne_2d(embeddings[:3])
    with pytest.raises(ValueError, match="at least 4"):
        umap_2d(embeddings[:3])


def test_reliability_and_ece():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95, 1.0, 0.9])
    rel = reliability(y, p, n_bins=10)
    assert (
        rel.count.sum() == len(y) and rel.count[0] == 1 and rel.count[1] == 2 and rel.count[9] == 4
    )
    # bins: [0,.1): p .05 obs 0; [.1,.2): p .15 obs .5; [.8,.9): p .85 obs 1; [.9,1]: p .95 obs .75
    expected = (1 * 0.05 + 2 * 0.35 + 1 * 0.15 + 4 * abs(0.75 - 0.95)) / 8
    assert rel.ece == pytest.approx(expected)
    assert reliability(np.array([0, 1] * 50), np.full(100, 0.5)).ece == pytest.approx(0.0)


def test_gallery_picks_most_confident_of_each_outcome():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    probs = np.array([0.9, 0.6, 0.2, 0.8, 0.3, 0.1, 0.05, 0.7])
    groups = {name: (list(ix), n) for name, ix, n in pick_examples(labels, probs, 0.5, per_group=2)}
    assert groups["True positives"] == ([0, 1], 2)
    assert groups["False positives"] == ([3, 7], 2)
    assert groups["False negatives"] == ([6, 2], 2)
    assert groups["True negatives"] == ([5, 4], 2)


class Wrapped(torch.nn.Module):
    """A model that is not a Classifier but keeps its interface (as an ensemble or a
    test-time-augmentation wrapper would): forward, embed, gradcam_layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def embed(self, x):
        return self.inner.embed(x)

    def gradcam_layer(self):
        return self.inner.gradcam_layer()


def test_one_pass_equals_predict_and_wrappers_work(report_run, report_split):
    predictor = Predictor.from_run(report_run, device="cpu")
    images = np.stack([predictor.load(p) for p in sorted(report_split.rglob("*.jpeg"))])
    emb, probs = embed_and_predict(predictor.model, images)
    np.testing.assert_array_equal(probs, predictor.predict_images(images))  # what evaluate sees
    wrapped = Wrapped(predictor.model)
    emb_w, probs_w = embed_and_predict(wrapped, images)
    np.testing.assert_allclose(emb_w, emb, atol=1e-5)
    np.testing.assert_allclose(probs_w, probs, atol=1e-6)
    heat = gradcam_heatmap(wrapped, images[int(np.argmax(probs))])
    assert heat.shape == images.shape[1:] and heat.max() > heat.min()
