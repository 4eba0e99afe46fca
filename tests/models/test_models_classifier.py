"""Classifier: input contract, staged forward, freezing, state_dict layout, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pneumoscope.models import BACKBONES, Classifier, build_model, get_spec

BACKBONE_NAMES = ["resnet50", "efficientnet_lite0"]


@pytest.fixture(scope="module", params=BACKBONE_NAMES)
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, weights="none").eval()


def _batch(size: int = 64, b: int = 2) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.rand(b, 1, size, size)


@pytest.mark.parametrize("size", [64, 224])
def test_output_and_embedding_shapes(model, size):
    x = _batch(size)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
    assert logits.shape == (2, 2)
    assert emb.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all()


def test_rejects_non_gray_input(model):
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        model(torch.rand(2, 3, 64, 64))


def test_forward_from_cached_features_is_exact(model):
    x = _batch()
    with torch.no_grad():
        full = model(x)
        emb = model.embed(x)
        for k in range(model.n_stages + 1):
            act = model.features_until(k, x)
            kept = act.clone()
            assert torch.equal(model.forward_from(k, act), full), k
            assert torch.equal(act, kept), k  # cached activations are not modified in place
            assert torch.equal(model.embed_from(k, act), emb), k


def test_embedding_matches_the_library_model():
    # The split into stages must be the library's own forward, nothing skipped.
    for name in BACKBONE_NAMES:
        spec = get_spec(name)
        torch.manual_seed(0)
        raw = spec.builder().eval()
        model = Classifier(spec, raw).eval()
        x = _batch()
        with torch.no_grad():
            ours = model.embed(x)
            normed = model.normalise(x)
            feats = raw.forward_features(normed) if hasattr(raw, "forward_features") else None
            if feats is not None:  # timm
                theirs = raw.forward_head(feats, pre_logits=True)
            else:  # torchvision resnet
                theirs = torch.flatten(raw.avgpool(_resnet_trunk(raw, normed)), 1)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _resnet_trunk(raw, x):
    x = raw.maxpool(raw.relu(raw.bn1(raw.conv1(x))))
    return raw.layer4(raw.layer3(raw.layer2(raw.layer1(x))))


def test_normalisation_per_backbone():
    x = torch.full((1, 1, 4, 4), 127.0 / 255.0)
    lite = Classifier("efficientnet_lite0")
    assert torch.allclose(lite.normalise(x), torch.zeros(1, 3, 4, 4), atol=1e-6)  # (127-127)/128
    assert torch.allclose(
        lite.normalise(torch.ones(1, 1, 2, 2)), torch.full((1, 3, 2, 2), 128 / 128)
    )
    r50 = Classifier("resnet50")
    out = r50.normalise(torch.ones(1, 1, 2, 2))
    expect = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expect)


def _bn_modes(stage: nn.Module) -> set[bool]:
    return {m.training for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_freeze_stages_keeps_frozen_bn_in_eval():
    model = build_model("resnet50", weights="none")
    n = 3
    model.freeze_stages(n)
    model.train()
    assert model.frozen_stages == n
    for i, stage in enumerate(model.stages):
        frozen = i < n
        assert _bn_modes(stage) == {not frozen}, i
        assert all(p.requires_grad != frozen for p in stage.parameters()), i
    assert model.head.weight.requires_grad and model.training

    before = [
        s.state_dict()["bn1.running_mean" if i == 0 else "0.bn1.running_mean"].clone()
        for i, s in enumerate(model.stages)
    ]
    logits = model(_batch())
    logits.sum().backward()
    for i, stage in enumerate(model.stages):
        key = "bn1.running_mean" if i == 0 else "0.bn1.running_mean"
        changed = not torch.equal(stage.state_dict()[key], before[i])
        assert changed == (i >= n), i  # frozen BN stats untouched by a train-mode pass
        grads = [p.grad for p in stage.parameters()]
        assert all((g is None) == (i < n) for g in grads), i


def test_unfreeze_with_zero():
    model = Classifier("efficientnet_lite0")
    model.freeze_stages(model.n_stages)
    model.train()
    assert not any(p.requires_grad for p in model.stages.parameters())
    model.freeze_stages(0)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError):
        model.freeze_stages(model.n_stages + 1)


def test_eval_then_train_round_trip_respects_freeze():
    model = Classifier("resnet50")
    model.freeze_stages(2)
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert _bn_modes(model.stages[1]) == {False} and _bn_modes(model.stages[2]) == {True}


def test_state_dict_layout_is_stable(tmp_path):
    from safetensors.torch import load_file, save_file

    r50 = Classifier("resnet50")
    keys = set(r50.state_dict())
    assert {
        "stages.0.conv1.weight",
        "stages.1.0.conv1.weight",
        "stages.4.2.bn3.bias",
        "head.weight",
        "head.bias",
    } <= keys
    assert not any(k.startswith(("fc.", "norm_")) for k in keys)
    assert r50.state_dict()["head.weight"].shape == (2, 2048)

    lite = Classifier("efficientnet_lite0")
    keys = set(lite.state_dict())
    assert {
        "stages.0.conv_stem.weight",
        "stages.0.bn1.running_var",
        "stages.1.0.conv_dw.weight",
        "stages.7.0.conv_pwl.weight",
        "stages.8.conv_head.weight",
        "stages.8.bn2.weight",
    } <= keys
    assert not any(k.startswith(("classifier.", "norm_")) for k in keys)

    # The training code saves with safetensors: a round trip restores the same model.
    path = tmp_path / "m.safetensors"
    save_file(lite.state_dict(), str(path))
    other = Classifier("efficientnet_lite0")
    other.load_state_dict(load_file(str(path)), strict=True)
    x = _batch()
    with torch.no_grad():
        assert torch.equal(lite.eval()(x), other.eval()(x))


def test_gradcam_layer_is_last_conv_stage():
    r50 = Classifier("resnet50")
    assert r50.gradcam_layer() is r50.stages[4]
    lite = Classifier("efficientnet_lite0")
    assert lite.gradcam_layer() is lite.stages[-1]
    assert isinstance(lite.gradcam_layer().conv_head, nn.Conv2d)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stages_cover_every_backbone_parameter(name):
    # Nothing of the library model is left out of the stages except its own head.
    spec = get_spec(name)
    raw = spec.builder()
    in_stages = {id(p) for stage in spec.splitter(raw) for p in stage.parameters()}
    for key, p in raw.named_parameters():
        assert (id(p) in in_stages) != key.startswith(spec.head_prefixes), key
    assert len(spec.splitter(raw)) == spec.n_stages


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(
        ValueError, match="resnet50.*efficientnet_lite0|efficientnet_lite0.*resnet50"
    ):
        get_spec("vgg16")
    with pytest.raises(ValueError, match="valid backbones"):
        build_model("vgg16", weights="none")
