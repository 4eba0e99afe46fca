"""The pneumonia classifier: fixed normalisation -> backbone stages -> pool -> Linear(2).

Input contract (docs/architecture.md): float ``(B, 1, S, S)`` in ``[0, 1]``, grayscale.
Everything backbone-specific (gray -> 3 channels, mean/std) happens here so that every
caller (training, predict, serve, ONNX export) feeds the same thing.

``state_dict`` layout (saved with safetensors by the training code; stable):

* ``stages.{i}.<library names>`` — the backbone's own modules, lowest first, e.g.
  resnet50 ``stages.0.conv1.weight``, ``stages.0.bn1.running_mean``,
  ``stages.1.0.conv1.weight`` (= torchvision ``layer1.0.conv1.weight``),
  ``stages.4.2.bn3.bias`` (= ``layer4.2.bn3.bias``);
  EfficientNet-Lite ``stages.0.conv_stem.weight``, ``stages.0.bn1.*``,
  ``stages.{s+1}.{j}.*`` (= timm ``blocks.{s}.{j}.*``), ``stages.8.conv_head.weight``,
  ``stages.8.bn2.*``.
* ``head.weight`` ``(C, feature_dim)``, ``head.bias`` ``(C,)`` — binary (C=2): class 1 is
  pneumonia; three-class (C=3): normal, bacterial, viral (pneumoscope.tasks).

The normalisation constants are non-persistent buffers (derived from ``backbone_name``),
so they are not in the state_dict. The library's own 1000-class head and pooling
are dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .registry import BackboneSpec, get_spec

PNEUMONIA_INDEX = 1
"""Column of the logits / softmax that is p(pneumonia); column 0 is normal."""


def images_to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (B,S,S) or (B,1,S,S) -> float (B,1,S,S) in [0,1]: the model's input contract."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.float().div_(255.0)


class Classifier(nn.Module):
    def __init__(
        self,
        backbone: str | BackboneSpec,
        raw_model: nn.Module | None = None,
        dropout: float = 0.2,
        n_classes: int = 2,
    ) -> None:
        """Wrap ``raw_model`` (the library model, weights already loaded) or a fresh one."""
        super().__init__()
        spec = get_spec(backbone) if isinstance(backbone, str) else backbone
        raw = spec.builder() if raw_model is None else raw_model
        stages = list(spec.splitter(raw))
        if len(stages) != spec.n_stages:
            raise ValueError(
                f"{spec.name}: splitter gave {len(stages)} stages, expected {spec.n_stages}"
            )
        self.backbone_name = spec.name
        self.stage_names = spec.stage_names
        self.feature_dim = spec.feature_dim
        self._gradcam_stage = spec.gradcam_stage
        self._frozen = 0
        # Fixed (B,1,S,S) -> (B,3,S,S) normalisation; not trainable, not saved.
        self.register_buffer("norm_mean", _channel_tensor(spec.mean), persistent=False)
        self.register_buffer("norm_std", _channel_tensor(spec.std), persistent=False)
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spec.feature_dim, n_classes)  # 3 for --task three-class

    # -------------------------------------------------------------- properties

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    @property
    def frozen_stages(self) -> int:
        return self._frozen

    # -------------------------------------------------------------- forward paths

    def normalise(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(
                f"expected a (B, 1, S, S) grayscale batch in [0, 1], got {tuple(x.shape)}"
            )
        return (x.expand(-1, 3, -1, -1) - self.norm_mean) / self.norm_std

    def features_until(self, k: int, x: Tensor) -> Tensor:
        """Normalise + stages[:k]: the activation to cache when stages[:k] are frozen."""
        act = self.normalise(x)
        for stage in self.stages[:k]:
            act = stage(act)
        return act

    def embed_from(self, k: int, act: Tensor) -> Tensor:
        """stages[k:] + global average pool -> (B, feature_dim)."""
        for stage in self.stages[k:]:
            act = stage(act)
        return act.mean(dim=(2, 3))

    def forward_from(self, k: int, act: Tensor) -> Tensor:
        """The rest of forward() from the output of stages[:k]; logits (B, n_classes)."""
        return self.head(self.dropout(self.embed_from(k, act)))

    def forward(self, x: Tensor) -> Tensor:
        # The same ops in the same order as forward_from(k, features_until(k, x)),
        # so the two agree exactly for every k.
        return self.forward_from(0, self.features_until(0, x))

    def embed(self, x: Tensor) -> Tensor:
        """The pooled embedding (B, feature_dim), before dropout and head."""
        return self.embed_from(0, self.features_until(0, x))

    # -------------------------------------------------------------- fine-tuning

    def freeze_stages(self, n: int) -> None:
        """Freeze stages[:n] (no grads, eval mode kept through .train()); n=0 unfreezes all."""
        if not 0 <= n <= self.n_stages:
            raise ValueError(f"freeze_stages: n must be in 0..{self.n_stages}, got {n}")
        self._frozen = n
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= n)
        self.train(self.training)  # re-apply the eval rule to the current mode

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen stages stay in eval mode: BatchNorm keeps its running stats (and the
        # cached activations of features_until stay valid), dropout/drop-path stay off.
        for stage in self.stages[: self._frozen]:
            stage.eval()
        return self

    def gradcam_layer(self) -> nn.Module:
        """The last conv stage, whose output Grad-CAM hooks."""
        return self.stages[self._gradcam_stage]


def _channel_tensor(values: tuple[float, float, float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
