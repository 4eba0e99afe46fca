"""predict_probs' precision: fp32 (the default) is the plain forward pass, bf16 stays close
to it, and PNEUMOSCOPE_PRECISION / an explicit argument decide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscope.data.cache import decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.inference import inference_precision, predict_probs
from pneumoscope.models import PNEUMONIA_INDEX, build_model
from pneumoscope.models.classifier import images_to_input


@pytest.fixture(scope="module")
def images(small_data_root):
    return decode_samples(discover_split(small_data_root / "test"), 96, show_progress=False).images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", weights="imagenet").eval()


def test_fp32_is_the_plain_forward_pass(model, images):
    p = predict_probs(model, images, batch_size=7, precision="fp32")
    with torch.no_grad():
        expected = torch.softmax(model(images_to_input(images)), dim=1)[:, PNEUMONIA_INDEX].numpy()
    np.testing.assert_allclose(p, expected, atol=1e-5)
    assert np.ptp(p) > 1e-3  # real images told apart, not a constant


def test_bf16_stays_close_to_fp32(model, images):
    a = predict_probs(model, images, precision="fp32")
    b = predict_probs(model, images, precision="bf16")
    assert np.max(np.abs(a - b)) < 0.05
    assert np.corrcoef(a, b)[0, 1] > 0.95  # the same ranking, up to bf16 rounding


def test_default_is_fp32_and_the_environment_decides(monkeypatch):
    monkeypatch.delenv("PNEUMOSCOPE_PRECISION", raising=False)
    assert inference_precision("cpu") == "fp32"
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "bf16")
    assert inference_precision("cpu") == "bf16"
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "auto")
    native = (
        torch.cpu._is_avx512_bf16_supported()
        or getattr(torch.cpu, "_is_amx_tile_supported", bool)()
    )
    assert inference_precision("cpu") == ("bf16" if native else "fp32")
    monkeypatch.setenv("PNEUMOSCOPE_PRECISION", "fp8")
    with pytest.raises(ValueError, match="PNEUMOSCOPE_PRECISION"):
        inference_precision("cpu")
