"""An ensemble of trained classifiers and test-time augmentation (TTA), as ONE model.

``Ensemble(members, views, image_size)`` has the Classifier's interface that every verb
uses: ``forward(x) -> (B, C)``, ``embed(x)``, Grad-CAM through ``for_gradcam()``; so
evaluate, predict, report, serve and the ONNX export run it unchanged. C is the members'
common class count (2 for binary runs, 3 for ``--task three-class``); members with other
counts are refused.

**What is averaged: probabilities.** Every member sees every view; the output is the mean
of their softmax probabilities (the deep-ensemble rule of Lakshminarayanan et al. 2017),
returned as its log, ``log(mean_i softmax(logits_i))``, so ``softmax(forward(x))`` is
exactly the mean of the members' class probabilities (binary: column 1 is the mean
p(pneumonia); three-class: p(bacterial) + p(viral) is). Averaging logits instead would
let one over-confident member (a logit of 15 against its neighbours' 2) outvote the rest,
and the members here differ in backbone and so in logit scale; a probability is bounded,
one member moves the mean by at most 1/n. The log is computed as a logsumexp of
log-softmaxes: finite even where a member is certain, so Grad-CAM's log-odds target stays
defined.

**Views** are deterministic, recorded transforms of the (B,1,S,S) input in [0,1]: a zoom
(> 1 magnifies the centre, < 1 shrinks the film inside a border-padded frame), a width
stretch ``aspect`` (the originals were squeezed to a square) and a gamma. No horizontal
flip: the heart sits on the left, and a mirrored film is an image no scanner produces.
Geometry goes through ``grid_sample`` on a grid fixed at build time (a buffer, not in the
state_dict), which the ONNX exporter turns into one GridSample node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pneumoscope.errors import OptionError

from .classifier import Classifier

IDENTITY = {"zoom": 1.0, "aspect": 1.0, "gamma": 1.0}

# --tta presets: explicit view lists, recorded in the ensemble's config.json as such (a
# later change of a preset never changes a written ensemble).
TTA_PRESETS: dict[str, list[dict]] = {
    "none": [IDENTITY],
    "zoom3": [IDENTITY, {**IDENTITY, "zoom": 0.9}, {**IDENTITY, "zoom": 1.1}],
    "mixed5": [
        IDENTITY,
        {**IDENTITY, "zoom": 0.9},
        {**IDENTITY, "zoom": 1.1},
        {**IDENTITY, "aspect": 0.9},
        {**IDENTITY, "aspect": 1.1},
    ],
    "photo3": [IDENTITY, {**IDENTITY, "gamma": 0.8}, {**IDENTITY, "gamma": 1.25}],
}


def tta_views(name: str) -> list[dict]:
    if name not in TTA_PRESETS:
        raise OptionError(f"unknown TTA preset {name!r}; choose one of: {', '.join(TTA_PRESETS)}")
    return [dict(v) for v in TTA_PRESETS[name]]


class View(nn.Module):
    """One recorded test-time view: (B,1,S,S) in [0,1] -> the same shape."""

    def __init__(self, spec: dict, size: int):
        super().__init__()
        unknown = set(spec) - set(IDENTITY)
        if unknown:
            raise ValueError(
                f"TTA view {spec}: unknown keys {sorted(unknown)}; known: {sorted(IDENTITY)}"
            )
        self.spec = {**IDENTITY, **{k: float(v) for k, v in spec.items()}}
        if min(self.spec.values()) <= 0:
            raise ValueError(f"TTA view {spec}: zoom, aspect and gamma must be > 0")
        self.geometric = self.spec["zoom"] != 1.0 or self.spec["aspect"] != 1.0
        # (S,S,2), not 4-D: Predictor's channels_last conversion leaves a 3-D buffer alone
        self.register_buffer(
            "grid", _grid(self.spec["zoom"], self.spec["aspect"], size), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.geometric:
            grid = self.grid.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.spec["gamma"] != 1.0:
            x = x.clamp(0.0, 1.0).pow(self.spec["gamma"])
        return x


def _grid(zoom: float, aspect: float, size: int) -> Tensor:
    """The sampling grid of a centred zoom and width stretch (aspect > 1 widens)."""
    zx, zy = zoom * math.sqrt(aspect), zoom / math.sqrt(aspect)
    theta = torch.tensor([[[1.0 / zx, 0.0, 0.0], [0.0, 1.0 / zy, 0.0]]])
    return F.affine_grid(theta, [1, 1, size, size], align_corners=False)[0]


class Ensemble(nn.Module):
    """Members x views, probabilities averaged (see the module docstring).

    state_dict: ``members.{i}.<Classifier keys>``; the views hold no weights."""

    def __init__(self, members: list[Classifier], views: list[dict], image_size: int):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        counts = [m.n_classes for m in members]
        if len(set(counts)) > 1:
            raise ValueError(
                f"ensemble members output {counts} classes; they must all output the same number"
            )
        self.n_classes = counts[0]
        self.members = nn.ModuleList(members)
        self.views = nn.ModuleList(View(v, image_size) for v in (views or [IDENTITY]))

    def forward(self, x: Tensor) -> Tensor:
        logp = [
            F.log_softmax(member(view(x)).float(), dim=1)
            for member in self.members
            for view in self.views
        ]
        return torch.logsumexp(torch.stack(logp), dim=0) - math.log(len(logp))

    def embed(self, x: Tensor) -> Tensor:
        """Each member's embedding averaged over the views, members side by side:
        (B, sum of the members' feature_dim)."""
        return torch.cat(
            [torch.stack([m.embed(v(x)) for v in self.views]).mean(0) for m in self.members], dim=1
        )

    @property
    def feature_dim(self) -> int:
        return sum(m.feature_dim for m in self.members)

    def for_gradcam(self) -> tuple[nn.Module, list[nn.Module]]:
        """(model to run, layers to hook) for Grad-CAM: the members on the unaugmented view
        (a zoomed view's map would not line up with the film), one hooked layer per member;
        pytorch-grad-cam averages the members' maps. Shares the members' modules."""
        plain = Ensemble.__new__(Ensemble)
        nn.Module.__init__(plain)
        plain.members, plain.n_classes = self.members, self.n_classes
        plain.views = nn.ModuleList([View(IDENTITY, 1)])
        return plain, [m.gradcam_layer() for m in self.members]
