"""Every training option in one dataclass; config.json is its dict plus versions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    data: str
    out: str
    backbone: str = "auto"  # resolved to a registry name before training starts
    weights: str = "imagenet"  # imagenet | none | PATH to a state_dict
    # recipe: auto | cpu-fast | full (training.recipes); the options set to None below take
    # the recipe's value, resolved when the config is made (so a config is always concrete).
    recipe: str = "auto"
    task: str = "binary"  # binary | three-class (NORMAL / BACTERIAL / VIRAL; pneumoscope.tasks)
    epochs: int | None = None
    image_size: int | None = None
    batch_size: int | None = None
    balance: str = "loss"  # loss | sampler | none
    val_fraction: float = 0.15
    seed: int = 0
    # seed of the patient-grouped split alone (None: seed). Runs that differ in seed but
    # share split_seed share their validation part, so they can form an ensemble.
    split_seed: int | None = None
    lr: float | None = None  # head learning rate; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    head_epochs: int | None = None  # staged fine-tuning: epochs that train the head alone
    trainable_stages: int | None = None  # after head_epochs: top stages unfrozen (-1: all)
    patience: int | None = None  # early stopping on validation ROC AUC
    augment: str | None = None  # a preset of pneumoscope.data.augment.PRESETS
    dropout: float | None = None
    label_smoothing: float | None = None
    views: int | None = None  # cpu-fast: augmented views of each training image through the trunk
    cache_dir: str = ""  # decode/activation cache ("": $PNEUMOSCOPE_CACHE or ~/.cache/pneumoscope)
    # precision, trunk_precision, trunk_engine and device: as given, then replaced by what they resolve
    # to when training starts (config.json records what ran; full: no trunk, None).
    trunk_precision: str | None = (
        "auto"  # cpu-fast trunk pass: auto (trunk_engine.resolve_trunk_precision) | bf16 | fp32
    )
    trunk_engine: str | None = (
        "auto"  # cpu-fast trunk pass: auto | torch | onnxruntime (training.trunk_engine)
    )
    strict: bool = False  # stop before any work if a file is unreadable
    patients: str = ""  # CSV of file -> patient id ("": ids from Kermany file names)
    device: str = "auto"
    # Scale-out and the GPU fast path (docs/scale-out.md); none of them changes the recipe.
    precision: str = "auto"  # auto | bf16 | fp32: pneumoscope.models.precision (bf16 where native: CUDA; CPU too in cpu-fast)
    compile: bool = False  # torch.compile the training step's model
    scale_lr: bool = False  # under torchrun: lr x world_size (linear scaling rule)
    log: str = ""  # experiment trackers, comma-separated: tensorboard, mlflow (report.trackers)

    def __post_init__(self) -> None:
        from pneumoscope.training.recipes import apply_recipe

        apply_recipe(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Options that must match for --resume to continue a run rather than start another.
RESUME_KEYS = (
    "backbone",
    "weights",
    "epochs",
    "image_size",
    "batch_size",
    "balance",
    "val_fraction",
    "seed",
    "split_seed",
    "lr",
    "backbone_lr_scale",
    "weight_decay",
    "warmup_epochs",
    "head_epochs",
    "trainable_stages",
    "augment",
    "dropout",
    "label_smoothing",
    "recipe",
    "views",
    "task",
)
# What the run resolved from auto (config.json records these values, not "auto"); a
# --resume that would resolve any of them otherwise is refused, naming it (in this order).
RESOLVED_KEYS = (
    "recipe",
    "backbone",
    "device",
    "precision",
    "trunk_precision",
    "trunk_engine",
    "decode_version",
)
# The TrainConfig fields among them that resolve_config sets, in the order config.json's
# "requested" block has always listed them.
RESOLVED_FIELDS = ("backbone", "precision", "trunk_precision", "trunk_engine", "device")
