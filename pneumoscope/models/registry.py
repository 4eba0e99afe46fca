"""Backbones as data: one `BackboneSpec` per name.

Adding a backbone = adding one entry to `BACKBONES` (builder, stage splitter,
normalisation, ImageNet weights source). Nothing else in the code branches on the
backbone name.

Stage layout (the `Classifier.stages` ModuleList, lowest first):

* ``resnet50``: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``.
* ``efficientnet_lite{0,1,2}``: ``stem`` (conv_stem, bn1 incl. ReLU6),
  ``blocks0`` .. ``blocks6`` (timm's ``blocks[i]``), ``head`` (conv_head, bn2 incl. ReLU6).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from pneumoscope.errors import OptionError

from . import weights as _w

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite preprocessing is (x*255 - 127) / 128, i.e. on the 0..1 scale:
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """Everything backbone-specific, so the rest of the code never branches on a name."""

    name: str
    builder: Callable[[], nn.Module]
    """Returns the raw library model (torchvision / timm, 1000-class head), random init."""
    stage_names: tuple[str, ...]
    splitter: Callable[[nn.Module], Sequence[nn.Module]]
    """Raw model -> its own stage modules (same objects, so the weights stay the library's)."""
    feature_dim: int
    mean: tuple[float, float, float]
    """Per-channel normalisation on the 0..1 scale, applied inside the Classifier."""
    std: tuple[float, float, float]
    load_imagenet: Callable[[nn.Module], None]
    """Loads ImageNet weights into the raw model in place; raises WeightsError."""
    imagenet_available: Callable[[], bool]
    """True when ImageNet weights can be had without the network."""
    head_prefixes: tuple[str, ...]
    """Raw-model keys of the 1000-class head: optional in a --weights PATH file, ignored."""
    gradcam_stage: int = -1
    """Index into stages of the last conv stage (the Grad-CAM target)."""
    adapt_keys: Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]] = field(
        default=_w.identity_keys
    )
    """Translates foreign key names of a --weights PATH file to the raw model's names."""

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)


# ---------------------------------------------------------------- resnet50


def _build_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _split_resnet(model: nn.Module) -> list[nn.Module]:
    # The stem keeps torchvision's attribute names so state_dict keys read
    # stages.0.conv1.weight, stages.1.0.conv1.weight, ...
    stem = nn.Sequential(
        OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool)
    )
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


# ------------------------------------------------------- EfficientNet-Lite


def _build_lite(variant: int) -> nn.Module:
    import timm

    return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)


def _split_lite(model: nn.Module) -> list[nn.Module]:
    # timm's BatchNormAct2d bn1/bn2 include the ReLU6, so the stem and head are complete.
    stem = nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1))
    head = nn.Sequential(OrderedDict(conv_head=model.conv_head, bn2=model.bn2))
    return [stem, *model.blocks, head]


def _lite_spec(variant: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        builder=partial(_build_lite, variant),
        stage_names=("stem", *(f"blocks{i}" for i in range(7)), "head"),
        splitter=_split_lite,
        feature_dim=1280,
        mean=LITE_MEAN,
        std=LITE_STD,
        load_imagenet=partial(_w.load_lite_imagenet, variant),
        imagenet_available=partial(_w.lite_package_available, variant),
        head_prefixes=("classifier.",),
        adapt_keys=_w.adapt_lite_keys,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        name="resnet50",
        builder=_build_resnet50,
        stage_names=("stem", "layer1", "layer2", "layer3", "layer4"),
        splitter=_split_resnet,
        feature_dim=2048,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        load_imagenet=_w.load_resnet50_imagenet,
        imagenet_available=_w.resnet50_imagenet_cached,
        head_prefixes=("fc.",),
    ),
    "efficientnet_lite0": _lite_spec(0),
    "efficientnet_lite1": _lite_spec(1),
    "efficientnet_lite2": _lite_spec(2),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise OptionError(f"unknown backbone {name!r}; valid backbones: {valid}") from None


def imagenet_weights_available(name: str) -> bool:
    """True when the backbone's ImageNet weights are on this machine (no network used)."""
    return get_spec(name).imagenet_available()
