"""Grad-CAM heatmaps of the pneumonia class (pytorch-grad-cam) and their overlays.

Public interface (the report, `explain` and the web app use it):

- ``gradcam_heatmap(model, image) -> float32 (S, S) in [0, 1]``
  (``gradcam_heatmaps`` for a batch (N, S, S) in one pass)
- ``overlay_heatmap(image, heatmap, alpha=0.4) -> uint8 (S, S, 3)``

The model is only used through ``forward(x) -> (B, C) logits`` (C = 2 or 3) and ``gradcam_layer()``
(the last conv stage), or, for an ensemble, ``for_gradcam()`` (its members on the
unaugmented view, one hooked layer each; pytorch-grad-cam averages their maps).

Shared models (a web server): a call leaves the model as it found it — no hooks left
on it, every module's train/eval mode restored, parameters' ``requires_grad`` untouched
and their ``.grad`` restored. Calls are serialised by a module lock, so several threads
may call it; they run one at a time. The hooks only record the calling thread's
forward pass, so a plain prediction running in another thread at the same moment is
neither disturbed nor mixed into the heatmap.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib import colormaps
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

from pneumoscope.models.classifier import PNEUMONIA_INDEX, images_to_input

_LOCK = threading.Lock()
_COLORMAP = colormaps["jet"]


class PneumoniaLogOdds:
    """Grad-CAM target: logit(pneumonia) - logit(normal), i.e. the log-odds that the
    softmax turns into p(pneumonia); regions that raise it are what the heatmap shows."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == 2:
            return logits[..., PNEUMONIA_INDEX] - logits[..., 1 - PNEUMONIA_INDEX]
        # three-class: log(p(bacterial) + p(viral)) - log p(normal)
        return torch.logsumexp(logits[..., 1:], dim=-1) - logits[..., 0]


class ClassLogOdds:
    """Grad-CAM target of one class c: log p(c) - log(1 - p(c)), its one-vs-rest log-odds."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        others = torch.cat([logits[..., : self.index], logits[..., self.index + 1 :]], dim=-1)
        return logits[..., self.index] - torch.logsumexp(others, dim=-1)


class _ThisThreadActivations(ActivationsAndGradients):
    """pytorch-grad-cam's hook recorder, but blind to forward passes of other threads
    (the web server may predict with the same model while a heatmap is computed)."""

    def __init__(self, *args, **kwargs):
        self._thread = threading.get_ident()
        super().__init__(*args, **kwargs)

    def save_activation(self, module, input, output):
        if threading.get_ident() == self._thread:
            super().save_activation(module, input, output)

    def save_gradient(self, module, input, output):
        if threading.get_ident() == self._thread:
            super().save_gradient(module, input, output)


class _GradCAM(GradCAM):
    def __init__(self, model: torch.nn.Module, target_layers: list[torch.nn.Module]):
        super().__init__(model=model, target_layers=target_layers)
        # Swap the library's recorder for the thread-aware one (same hooks, same layers).
        self.activations_and_grads.release()
        self.activations_and_grads = _ThisThreadActivations(model, target_layers, None, True)


@contextmanager
def _model_left_as_found(model: torch.nn.Module):
    """Restore every module's train/eval mode and every parameter's .grad afterwards
    (pytorch-grad-cam puts the model in eval mode and back-propagates into it)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            param.grad = grad


def gradcam_heatmap(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Grad-CAM of the pneumonia class for one image.

    image: uint8 (S, S), as returned by ``Predictor.load``. Returns float32 (S, S) in
    [0, 1] (all zeros when nothing in the image raises the pneumonia score). Thread-safe:
    concurrent calls run one at a time.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"gradcam_heatmap: expected a uint8 (S, S) image, got {image.dtype} {image.shape}"
        )
    return gradcam_heatmaps(model, image[None])[0]


def gradcam_heatmaps(
    model: torch.nn.Module, images: np.ndarray, target_class: int | None = None
) -> np.ndarray:
    """gradcam_heatmap for a uint8 batch (N, S, S) in one forward/backward pass (the model
    runs in eval mode, so images do not affect each other): float32 (N, S, S).
    target_class: None for the pneumonia log-odds, else that class's (ClassLogOdds)."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"gradcam_heatmaps: expected uint8 (N, S, S) images, got {images.dtype} {images.shape}"
        )
    device = next(model.parameters()).device
    with _LOCK, _model_left_as_found(model), torch.inference_mode(False), torch.enable_grad():
        # Made here, not under the caller's inference_mode. It requires grad so that the
        # hooked activations do too, even when every parameter is frozen (a served model).
        x = images_to_input(images).to(device).requires_grad_(True)
        net, layers = _cam_target(model)
        with _GradCAM(net, layers) as cam:
            target = PneumoniaLogOdds() if target_class is None else ClassLogOdds(target_class)
            heat = cam(input_tensor=x, targets=[target] * len(images))
    return np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)


def _cam_target(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(module to run, layers to hook): an ensemble names its own (its members on the
    unaugmented view, models.ensemble.Ensemble.for_gradcam); a Classifier its last stage."""
    if hasattr(model, "for_gradcam"):
        return model.for_gradcam()
    return model, [model.gradcam_layer()]


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The X-ray in gray with the heatmap (jet colours) blended over it: uint8 (S, S, 3)."""
    image, heatmap = np.asarray(image), np.asarray(heatmap, dtype=np.float32)
    if image.shape != heatmap.shape or image.ndim != 2:
        raise ValueError(
            f"overlay_heatmap: image {image.shape} and heatmap {heatmap.shape} must be the same (S, S)"
        )
    gray = np.repeat(image.astype(np.float32)[..., None] / 255.0, 3, axis=2)
    colour = _COLORMAP(np.clip(heatmap, 0.0, 1.0))[..., :3].astype(np.float32)
    blended = (1.0 - alpha) * gray + alpha * colour
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
