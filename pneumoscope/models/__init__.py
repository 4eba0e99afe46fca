"""Backbones, the Classifier, and where their weights come from.

model = build_model("efficientnet_lite0", weights="imagenet")
p_pneumonia = model(x).softmax(dim=1)[:, PNEUMONIA_INDEX]   # x: (B,1,S,S) in [0,1]
"""

from __future__ import annotations

from .classifier import PNEUMONIA_INDEX, Classifier
from .registry import BACKBONES, BackboneSpec, get_spec, imagenet_weights_available
from .weights import WeightsError, load_weights, lukemelas_to_timm, read_state_dict

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "Classifier",
    "PNEUMONIA_INDEX",
    "WeightsError",
    "build_model",
    "get_spec",
    "imagenet_weights_available",
    "load_weights",
    "lukemelas_to_timm",
    "read_state_dict",
]


def build_model(
    backbone: str, weights: str = "imagenet", dropout: float = 0.2, n_classes: int = 2
) -> Classifier:
    """The backbone with ``weights`` ("imagenet" | "none" | a state_dict file) and a new
    head of ``n_classes`` (2: binary, 3: three-class). Raises OptionError for an unknown
    backbone, WeightsError for weights."""
    spec = get_spec(backbone)
    raw = spec.builder()
    load_weights(spec, raw, weights)
    return Classifier(spec, raw, dropout=dropout, n_classes=n_classes)
