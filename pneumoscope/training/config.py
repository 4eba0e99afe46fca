"""Every training option in one dataclass; config.json is its dict plus versions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    data: str
    out: str
    backbone: str = "auto"  # resolved to a registry name before training starts
    weights: str = "imagenet"  # imagenet | none | PATH to a state_dict
    epochs: int = 12
    image_size: int = 224
    batch_size: int = 32
    balance: str = "loss"  # loss | sampler | none
    val_fraction: float = 0.15
    seed: int = 0
    lr: float = 1e-3  # head learning rate; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    head_epochs: int = 1  # staged fine-tuning: epochs that train the head alone
    trainable_stages: int = -1  # after head_epochs: top stages unfrozen (-1: all)
    patience: int = 4  # early stopping on validation ROC AUC
    augment: str = "medium"  # none | light | medium | strong
    dropout: float = 0.2
    label_smoothing: float = 0.0
    strict: bool = False  # stop before any work if a file is unreadable
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Options that must match for --resume to continue a run rather than start another.
RESUME_KEYS = (
    "backbone", "weights", "epochs", "image_size", "batch_size", "balance", "val_fraction", "seed",
    "lr", "backbone_lr_scale", "weight_decay", "warmup_epochs", "head_epochs",
    "trainable_stages", "augment", "dropout", "label_smoothing",
)
