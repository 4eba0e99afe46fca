"""The cached frozen trunk: the cpu-fast recipe's inputs.

With stages[:k] frozen (ImageNet weights, BatchNorm in eval mode) their output for an
image never changes during training, so it is computed once per image and per view
and the unfrozen top, ``model.forward_from(k, act)``, trains on the stored activations:
an epoch costs the top's forward and backward only.

Views: ``views`` augmented copies of every training image (the train augmentation of
pneumoscope.data.augment, applied to the [0, 1] image *before* the trunk, each view
drawn from the stream of (seed, view), training.seeds) plus the clean image; each epoch
picks one view per image from the stream of (seed, epoch), so ``--resume`` repeats an
epoch exactly. Validation uses the clean view.

Activations are stored as float16, channels-last (N, H, W, C), in the persistent cache
(pneumoscope.data.diskcache): the key holds everything they depend on (trunk weights,
k, image contents and order, augmentation, seed, view, precision), so a second run with
the same data and trunk reuses them, and a changed image or weight computes anew.

The trunk pass runs with the conv+BatchNorm pairs folded (exact up to rounding; checked
against the unfolded trunk) and, on CPUs with native bf16 (AVX512-BF16/AMX), under bf16
autocast in channels_last; see benchmarks/RESULTS.md for the speed and AUC comparison.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import replace

import numpy as np
import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from pneumoscope.data.augment import PRESETS, AugmentConfig, augment_batch
from pneumoscope.data.cache import DecodedSet
from pneumoscope.data.diskcache import (
    array_digest,
    prune,
    read_array,
    resolve_cache_dir,
    write_array,
)
from pneumoscope.errors import OptionError
from pneumoscope.models.classifier import images_to_input
from pneumoscope.models.precision import autocast, resolve_precision
from pneumoscope.training import seeds
from pneumoscope.training.trunk_engine import (
    build_engine,
    resolve_trunk_engine,
    resolve_trunk_precision,
)

log = logging.getLogger(__name__)

TRUNK_BATCH = 32  # images per trunk pass; part of the cache key (augmentation draws per batch)
TRUNK_CACHE_MAX_BYTES = 8 * 2**30  # least recently used activation files beyond this are removed
FORMAT = 2  # bump when the stored layout or the view seeding changes (2: training.seeds streams)


# ----------------------------------------------------------------------------- the trunk


def _fold_children(module: nn.Module) -> int:
    """Fold every Conv2d that is immediately followed (in registration order, which is
    the forward order in torchvision's and timm's blocks) by a BatchNorm into that conv
    (subclasses such as timm's Conv2dSame keep their class, so their padding)."""
    folded = 0
    for child in module.children():
        folded += _fold_children(child)
    names = list(module._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = module._modules[a], module._modules[b]
        if not (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
        ):
            continue
        if type(bn) is nn.BatchNorm2d:
            rest = nn.Identity()
        elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d: BN + act
            rest = nn.Sequential(bn.drop, bn.act)
        else:
            continue
        module._modules[a] = fuse_conv_bn_eval(conv, bn)
        module._modules[b] = rest
        folded += 1
    return folded


class FrozenTrunk(nn.Module):
    """normalise + stages[:k] of a Classifier, in eval mode, BatchNorm folded when exact."""

    def __init__(self, model, k: int):
        super().__init__()
        self.register_buffer("norm_mean", model.norm_mean.detach().clone(), persistent=False)
        self.register_buffer("norm_std", model.norm_std.detach().clone(), persistent=False)
        stages = copy.deepcopy(nn.Sequential(*model.stages[:k])).eval()
        reference = nn.Sequential(*model.stages[:k])
        was_training = [m.training for m in reference]
        reference.eval()
        folded = _fold_children(stages)
        if folded and not _same_output(reference, stages, model):
            log.warning("BatchNorm folding changed the trunk's output; running it unfolded")
            stages = copy.deepcopy(reference).eval()
        for m, mode in zip(reference, was_training):
            m.train(mode)
        self.stages = stages.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops as Classifier.normalise, on copies of its constants.
        return self.stages((x.expand(-1, 3, -1, -1) - self.norm_mean) / self.norm_std)


@torch.inference_mode()
def _same_output(reference: nn.Module, folded: nn.Module, model) -> bool:
    x = model.normalise(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    ref, out = reference(x), folded(x)
    return bool(torch.allclose(ref, out, rtol=1e-3, atol=1e-3 * float(ref.abs().max())))


def trunk_digest(model, k: int) -> str:
    """Identity of the frozen stages' weights and buffers (what their output depends on)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model.backbone_name}:{k}".encode())
    for name, tensor in nn.Sequential(*model.stages[:k]).state_dict().items():
        h.update(name.encode())
        h.update(array_digest(tensor.detach().cpu().contiguous().numpy()).encode())
    return h.hexdigest()


@torch.inference_mode()
def trunk_activations(
    trunk: FrozenTrunk,
    images: np.ndarray,
    *,
    augment: AugmentConfig | None,
    gen: torch.Generator | None,
    precision: str,
    device: torch.device,
    desc: str = "trunk",
    show_progress: bool = True,
    engine=None,
) -> np.ndarray:
    """float16 (N, H, W, C) outputs of the trunk for uint8 images (N, S, S); engine: what
    runs it (trunk_engine.build_engine; default the torch module itself)."""
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    run_trunk = engine if engine is not None else trunk
    out = None
    starts = range(0, len(images), TRUNK_BATCH)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not show_progress):
        x = images_to_input(images[start : start + TRUNK_BATCH])
        if augment is not None:
            x = augment_batch(x, augment, gen)
        with autocast(device, precision):
            act = run_trunk(x.to(device).contiguous(memory_format=torch.channels_last))
        act = act.to(torch.float16).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if out is None:
            out = np.empty((len(images), *act.shape[1:]), dtype=np.float16)
        out[start : start + len(act)] = act
    return out


# ----------------------------------------------------------------------------- the store


class ActivationStore:
    """Activations keyed by everything they depend on; in memory when caching is off."""

    def __init__(self, cache_dir, max_bytes: int = TRUNK_CACHE_MAX_BYTES):
        root = resolve_cache_dir(cache_dir)
        self.folder = root / "trunk" if root is not None else None
        self.max_bytes = max_bytes

    def get(self, fields: dict, compute) -> np.ndarray:
        if self.folder is None:
            return compute()
        key = hashlib.blake2b(
            json.dumps(fields, sort_keys=True).encode(), digest_size=20
        ).hexdigest()
        path = self.folder / f"{key}.npy"
        found = read_array(path)
        if found is not None:
            return found[0]
        array = compute()
        try:
            write_array(path, array, {"fields": fields})
            prune(self.folder, self.max_bytes)
        except OSError as err:  # a full or read-only disk costs speed, never the run
            log.warning("could not write the activation cache in %s: %s", self.folder, err)
        return array


# ----------------------------------------------------------------------------- the inputs


def view_generator(seed: int, view: int) -> torch.Generator:
    return seeds.generator(seed, "views", view)


class TopNet(nn.Module):
    """What the training step calls: the Classifier from stage k on (activations in).

    Two CPU-only settings of the training step (eval mode, and so inference and the saved
    weights, are untouched; benchmarks/RESULTS.md, "CPU training step"):

    * the last BatchNorm of the top takes its input contiguous while training: the cached
      activations arrive channels_last, but the gradient coming back from the global
      average pool does not, and torch's CPU BatchNorm backward with the two layouts mixed
      is several times slower;
    * depthwise convolutions with kernels of 5 or more run in fp32 inside a bf16 step:
      torch's CPU weight gradient of a bf16 5x5 depthwise convolution is several times
      slower than the fp32 one (efficientnet_lite0's blocks5, trained with
      --trainable-stages 3), while a 3x3 one is as fast in bf16."""

    def __init__(self, model, k: int, device: torch.device | None = None):
        super().__init__()
        self.model, self.k = model, k
        if device is not None and torch.device(device).type == "cpu":
            top = list(nn.Sequential(*model.stages[k:]).modules())
            norms = [m for m in top if isinstance(m, nn.BatchNorm2d)]
            if norms:
                norms[-1].register_forward_pre_hook(_contiguous_while_training)
            for conv in top:
                if type(conv) in _FP32_CLASSES and _wide_depthwise(conv):
                    conv.__class__ = _FP32_CLASSES[type(conv)]

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from(self.k, act)


def _contiguous_while_training(module: nn.Module, inputs: tuple) -> tuple | None:
    return (inputs[0].contiguous(), *inputs[1:]) if module.training else None


def _wide_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels
        and max(module.kernel_size) >= 5
    )


class _Fp32WhileTraining:
    """Mixed into a convolution's class: in training under CPU autocast it runs in fp32
    (its input cast up, autocast off); otherwise exactly the base class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class Fp32TrainingConv2d(_Fp32WhileTraining, nn.Conv2d):
    pass


class Fp32TrainingConv2dSame(_Fp32WhileTraining, Conv2dSame):
    pass


# The convolution classes of the registry's backbones; the swap keeps the parameters and
# state_dict keys, and the classes are module-level, so copies and pickles keep working.
_FP32_CLASSES = {nn.Conv2d: Fp32TrainingConv2d, Conv2dSame: Fp32TrainingConv2dSame}


def activations_to_input(act: np.ndarray, device) -> torch.Tensor:
    """float16 (B, H, W, C) -> float32 (B, C, H, W) in channels_last (no transpose copy)."""
    act = np.require(act, requirements=["C", "W"])  # a read-only memmap slice is copied
    return torch.from_numpy(act).to(device).float().permute(0, 3, 1, 2)


class CachedTrunk:
    """The cpu-fast recipe's inputs for the training loop.

    net: what the step calls; feed(epoch): idx -> (activations, labels) of that epoch;
    step_cfg: the config the step sees (no augmentation on the fly: the views carry it);
    predict_val(model): class probabilities (N, C) of the validation images from their clean view.

    train_parts: the train set as [(role, DecodedSet, rows or None)], e.g. a run's train part
    and a site sample whose films repeat (`adapt`): each part's activations are computed (or
    found in the cache) once under its own key, then its rows taken; `train` must hold the
    same images in that order (its labels are the epoch's)."""

    def __init__(
        self,
        model,
        k: int,
        train: DecodedSet,
        val: DecodedSet,
        *,
        augment: AugmentConfig | None,
        views: int,
        seed: int,
        precision: str,
        device: torch.device,
        cache_dir=None,
        show_progress: bool = True,
        engine: str = "torch",
        train_parts: list | None = None,
    ):
        if not 1 <= k < model.n_stages:
            raise ValueError(
                f"the cached trunk needs 1 <= frozen stages < {model.n_stages}, got {k} "
                "(set --trainable-stages, or use --recipe full)"
            )
        self.k, self.seed, self.device = k, seed, device
        self.precision = "fp32"  # of the top's training step
        self._top = TopNet(model, k, device)
        trunk = FrozenTrunk(model, k)
        base = {
            "format": FORMAT,
            "trunk": trunk_digest(model, k),
            "k": k,
            "precision": precision,
            "batch": TRUNK_BATCH,
            "folded": True,
        }
        if engine != "torch":  # torch's keys stay as they were: caches of earlier runs still hit
            base["engine"] = engine
        store = ActivationStore(cache_dir)
        runner = None  # built on the first activations not in the cache (the export costs seconds)

        def run_trunk(x):
            nonlocal runner
            if runner is None:
                runner = build_engine(trunk, engine)
            return runner(x)

        def view(data: DecodedSet, role: str, v: int | None):
            aug = augment if v is not None else None
            # the file contents and the decoded size: the same files at another --image-size
            # are other activations
            fields = {
                **base,
                "images": keys_digest(data),
                "shape": list(data.images.shape[1:]),
                "augment": aug.as_dict() if aug else None,
                "seed": seed if aug else None,
                "view": v,
            }
            desc = f"trunk {role} " + (f"view {v + 1}/{views}" if v is not None else "clean")
            return store.get(
                fields,
                lambda: trunk_activations(
                    trunk,
                    data.images,
                    augment=aug,
                    gen=view_generator(seed, v) if aug else None,
                    precision=precision,
                    device=device,
                    desc=desc,
                    show_progress=show_progress,
                    engine=run_trunk,
                ),
            )

        parts = train_parts or [("train", train, None)]

        def train_view(v: int | None) -> np.ndarray:
            arrays = [
                view(data, role, v) if rows is None else view(data, role, v)[rows]
                for role, data, rows in parts
            ]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        self.val_acts = view(val, "val", None)
        self.train_views = [train_view(None)]
        if augment is not None:
            self.train_views += [train_view(v) for v in range(views)]
        self.train_labels = torch.as_tensor(train.labels, dtype=torch.int64)

    def net(self) -> nn.Module:
        return self._top

    def feed(self, epoch: int) -> EpochFeed:
        """idx -> (activations, labels): each image in the view drawn for it this epoch."""
        gen = seeds.generator(self.seed, "view_choice", epoch)
        choice = torch.randint(
            len(self.train_views), (len(self.train_labels),), generator=gen
        ).numpy()
        return EpochFeed(self.train_views, choice, self.train_labels, self.device)

    def step_cfg(self, cfg):
        return replace(cfg, augment="none")

    @torch.no_grad()
    def predict_val(self, model, batch_size: int = 256) -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, len(self.val_acts), batch_size):
            act = activations_to_input(self.val_acts[start : start + batch_size], self.device)
            logits = model.forward_from(self.k, act)
            out.append(torch.softmax(logits.float(), dim=1).cpu())
        return (
            torch.cat(out).numpy()
            if out
            else np.empty((0, model.head.out_features), dtype=np.float32)
        )


class EpochFeed:
    """The batch source of one epoch (the loop's feed interface: callable, .device)."""

    def __init__(self, views: list[np.ndarray], choice: np.ndarray, labels: torch.Tensor, device):
        self.views, self.choice, self.labels, self.device = views, choice, labels, device

    def __call__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx)
        picked = self.choice[idx]
        acts = np.empty((len(idx), *self.views[0].shape[1:]), dtype=np.float16)
        for v in np.unique(picked):
            rows = picked == v
            acts[rows] = self.views[v][idx[rows]]
        return activations_to_input(acts, self.device), self.labels[torch.as_tensor(idx)].to(
            self.device
        )


def keys_digest(data: DecodedSet) -> str:
    if len(data.keys) != len(data.samples):
        raise ValueError("the cached trunk needs the content keys of decode_samples")
    return hashlib.blake2b("\n".join(data.keys).encode(), digest_size=20).hexdigest()


def cached_trunk_for(
    cfg,
    model,
    train: DecodedSet,
    val: DecodedSet,
    device: torch.device,
    show_progress: bool = True,
    train_parts: list | None = None,
) -> CachedTrunk:
    """The cpu-fast inputs of a TrainConfig: stages below the top cfg.trainable_stages cached
    (train_parts: as CachedTrunk's)."""
    if cfg.trainable_stages < 1:
        raise OptionError(
            "--recipe cpu-fast trains the top --trainable-stages on cached activations: "
            f"give 1..{model.n_stages - 1} (got {cfg.trainable_stages}), or use --recipe full"
        )
    precision = resolve_trunk_precision(cfg.trunk_precision, device, engine=cfg.trunk_engine)
    inputs = CachedTrunk(
        model,
        model.n_stages - cfg.trainable_stages,
        train,
        val,
        augment=PRESETS[cfg.augment],
        views=cfg.views,
        seed=cfg.seed,
        precision=precision,
        device=device,
        cache_dir=cfg.cache_dir or None,
        show_progress=show_progress,
        engine=resolve_trunk_engine(cfg.trunk_engine, device, precision),
        train_parts=train_parts,
    )
    # The top's step: --precision, where auto means what the trunk pass uses (bf16 on CPUs
    # with native bf16: about 2x faster there, same validation AUC; benchmarks/RESULTS.md).
    inputs.precision = resolve_precision(cfg.precision, device)
    return inputs
