"""Training recipes: named sets of defaults for the options that differ between them.

* ``full`` — the staged fine-tune of the whole network, images augmented on the fly
  every step (the GPU recipe).
* ``cpu-fast`` — the lower stages frozen, their output cached once per image and
  augmented view (pneumoscope.training.trunk), and only the top trained on the cached
  activations: the whole train split to a finished model in minutes on a laptop CPU.
* ``auto`` (the default) — cpu-fast when training runs on a CPU, in one process, from
  pretrained weights; full otherwise (a GPU, torchrun, or ``--weights none``).

An option left unset (None) takes the recipe's value; one that is set always wins.
"""

from __future__ import annotations

import os

from pneumoscope.errors import OptionError

RECIPE_NAMES = ("auto", "cpu-fast", "full")

RECIPES: dict[str, dict] = {
    "full": {
        "epochs": 12,
        "image_size": 224,
        "batch_size": 32,
        "lr": 1e-3,
        "backbone_lr_scale": 0.1,
        "weight_decay": 0.05,
        "warmup_epochs": 1.0,
        "head_epochs": 1,
        "trainable_stages": -1,
        "patience": 4,
        "augment": "medium",
        "dropout": 0.2,
        "label_smoothing": 0.0,
        "views": 0,
    },
    # Chosen on the site sample and validation together (benchmarks/RESULTS.md, "The site
    # sample"): blocks6 + head trained on a cached Lite0 trunk at 128 px, clean + 2 "robust"
    # views, 8 epochs; early stopping after 3 epochs without a better validation ROC AUC.
    # 128 px rather than 224: over three seeds each, the site sample's ROC AUC rose
    # 0.971 -> 0.983 -> 0.987 from 224 to 160 to 128 px while validation's fell 0.998 -> 0.996.
    "cpu-fast": {
        "epochs": 8,
        "image_size": 128,
        "batch_size": 64,
        "lr": 1e-3,
        "backbone_lr_scale": 1.0,
        "weight_decay": 0.05,
        "warmup_epochs": 1.0,
        "head_epochs": 0,
        "trainable_stages": 2,
        "patience": 3,
        "augment": "robust",
        "dropout": 0.2,
        "label_smoothing": 0.0,
        "views": 2,
    },
}
RECIPE_FIELDS = tuple(RECIPES["full"])

# What `--backbone auto` means per recipe (full: resolve_backbone's rule in the loop).
RECIPE_BACKBONE = {"cpu-fast": "efficientnet_lite0"}


def training_on_cpu(device: str) -> bool:
    import torch  # here, not above: the CLI parser reads this module's tables

    if device == "auto":
        return not torch.cuda.is_available()
    return torch.device(device).type == "cpu"


def resolve_recipe_name(recipe: str, device: str, weights: str) -> str:
    if recipe not in RECIPE_NAMES:
        raise OptionError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPE_NAMES)}")
    if recipe != "auto":
        return recipe
    one_process = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    return "cpu-fast" if training_on_cpu(device) and one_process and weights != "none" else "full"


def apply_recipe(cfg) -> None:
    """Resolve cfg.recipe and fill every unset recipe option from it (in place).
    cfg.recipe_requested and cfg.recipe_filled (not options) tell training.budget what it
    may cut: the options a --recipe auto filled, never those given."""
    cfg.recipe_requested = cfg.recipe
    cfg.recipe = resolve_recipe_name(cfg.recipe, cfg.device, cfg.weights)
    cfg.recipe_filled = frozenset(
        name for name in RECIPES[cfg.recipe] if getattr(cfg, name) is None
    )
    for name in cfg.recipe_filled:
        setattr(cfg, name, RECIPES[cfg.recipe][name])
    if cfg.backbone == "auto" and cfg.recipe in RECIPE_BACKBONE:
        cfg.backbone = RECIPE_BACKBONE[cfg.recipe]
    if cfg.recipe == "cpu-fast" and cfg.trainable_stages < 1:  # before any work is done
        raise OptionError(
            "--recipe cpu-fast trains the top --trainable-stages on cached activations: "
            f"give 1 or more (got {cfg.trainable_stages}), or use --recipe full"
        )


def recipe_help(name: str) -> str:
    """'(default: cpu-fast X, full Y)' for the CLI help of a recipe option."""
    return f"(default: cpu-fast {RECIPES['cpu-fast'][name]}, full {RECIPES['full'][name]})"
