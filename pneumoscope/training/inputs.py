"""What one training epoch reads, per recipe: the loop asks its inputs object for the
network the step calls, the batches of an epoch, the config the step sees and the
validation probabilities, and is otherwise the same for every recipe.

* ImageInputs (full): decoded images, augmented on the fly by the step, the whole model.
* training.trunk.CachedTrunk (cpu-fast): cached activations of the frozen trunk, the top.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class ImageInputs:
    def __init__(
        self, feed, replicas, predict: Callable[[torch.nn.Module], np.ndarray], precision: str
    ):
        self._feed, self._replicas, self._predict = feed, replicas, predict
        self.precision = precision  # of the training step

    def net(self) -> torch.nn.Module:
        return self._replicas.current()

    def feed(self, epoch: int):
        return self._feed

    def step_cfg(self, cfg):
        return cfg

    def predict_val(self, model) -> np.ndarray:
        return self._predict(model)


def make_inputs(
    cfg,
    model,
    train_set,
    val_set,
    device,
    *,
    feed,
    replicas,
    predict,
    precision,
    show_progress=True,
    train_parts=None,
):
    """The inputs of cfg.recipe (cpu-fast: computes or loads the cached trunk first).
    precision: the step's, as resolved for the full recipe (cpu-fast resolves its own).
    train_parts: cpu-fast, train_set's parts, each cached apart (trunk.CachedTrunk)."""
    if cfg.recipe != "cpu-fast":
        return ImageInputs(feed, replicas, predict, precision)
    from pneumoscope.training.trunk import cached_trunk_for

    return cached_trunk_for(
        cfg, model, train_set, val_set, device, show_progress=show_progress, train_parts=train_parts
    )
