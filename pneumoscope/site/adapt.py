"""`pneumoscope adapt`: re-train a run's trainable part on its own train part plus a labelled
sample of a new site, and say honestly what that gained.

What it does, in order (nothing is written before the checks pass):

1. reads the source run (config.json: its recipe and options; model_best; manifest.csv: its
   train and validation parts, whose files must still exist) and the site sample in the
   Kermany layout, as `calibrate` reads it (at least MIN_PER_CLASS films per class);
2. cross-validates: the sample is cut into `folds` folds grouped by patient and stratified
   by class; for each fold the trainable part is re-trained, from the source model's
   weights, on the train part plus the other folds' films, and the held-out fold is scored.
   The pooled out-of-fold (OOF) scores give the adapted model's figures, next to the source
   model's on the same films, each at a site threshold chosen the same way on its own scores;
3. trains the final model the same way on every site film, and writes NEW_RUN: a run
   directory every verb reads, whose threshold.json keeps the validation rules and gets the
   default rule `site`, its value chosen on the pooled OOF scores (not on the final model's
   scores of films it was trained on), and adapt.json recording the source, the sample
   (each file's path, sha1, label, patient, fold, scores), the site weight and the CV figures.

Site weight: the share of each epoch's draws that are site films (oversampled by repetition,
each copy drawing its own augmented view); the run's validation part stays the validation
part (early stopping and the best epoch as `train` chooses them).

The CV figures are measured on the sample the operating point is chosen on: selection
data, optimistic for the threshold, never a test result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscope.data.cache import DecodedSet
from pneumoscope.data.manifest import read_manifest, sha1_by_path, write_manifest
from pneumoscope.errors import MissingFileError, OptionError
from pneumoscope.fsio import atomic_write_json, file_sha256
from pneumoscope.report.model_card import update_model_card
from pneumoscope.rundir import (
    ADAPT,
    BEST_MODEL,
    CONFIG,
    MANIFEST,
    THRESHOLD,
    RunDir,
    RunDirError,
    read_json,
)
from pneumoscope.site.calibrate import (
    DEFAULT_TARGET_SENSITIVITY,
    SITE_RULE,
    read_site_sample,
    sample_record,
    site_metrics,
    site_threshold,
)
from pneumoscope.tasks import task_labels

log = logging.getLogger(__name__)

# A fifth of each epoch: 120 site films are 2.7% of the shared train split as they are,
# too few draws to move the model in two epochs; at a half the site's few patients would
# outweigh the train part that keeps the model near what validation chose.
DEFAULT_SITE_WEIGHT = 0.2
DEFAULT_FOLDS = 5
# From the source model's weights, not from ImageNet: a short schedule re-fits the top to
# the mixed data; the warmup (a quarter of it) keeps the first steps from undoing the run.
DEFAULT_EPOCHS = 2
WARMUP_FRACTION = 0.25
CV_NOTE = (
    "selection data: figures on the site sample the threshold was chosen on (out-of-fold "
    "scores for the adapted model), optimistic for the threshold; not a test result"
)


# ----------------------------------------------------------------------------- checks


def check_options(site_weight: float, folds: int, epochs: int, target_sensitivity: float) -> None:
    if not 0.0 < site_weight < 1.0:
        raise OptionError(
            f"--site-weight is the site films' share of each epoch: give a value in (0, 1), "
            f"got {site_weight}"
        )
    if folds < 2:
        raise OptionError(f"--folds must be 2 or more (cross-validation), got {folds}")
    if epochs < 1:
        raise OptionError(f"--epochs must be 1 or more, got {epochs}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise OptionError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")


def check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """NEW_RUN must be another folder, and empty (or absent) unless --overwrite."""
    if out.resolve() == run_dir.resolve():
        raise OptionError(
            f"{out}: --out is the source run; adapt writes a new run directory and leaves "
            "the source untouched: choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder; choose another --out")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        what = "holds a run" if (out / CONFIG).exists() else "is not empty"
        raise RunDirError(
            f"{out}: {what} ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
            "--overwrite replaces it, or choose another --out"
        )


def check_source(run: RunDir, config: dict) -> None:
    if config.get("kind") == "ensemble":
        raise OptionError(
            f"{run.path}: is an ensemble; adapt re-trains one trained run (adapt its members, "
            "then `pneumoscope ensemble` the adapted runs)"
        )
    run.best_model_path()  # a run that never finished an epoch is refused here, naming the file
    run.read_threshold()
    if not (run / MANIFEST).exists():
        raise RunDirError(
            f"{run.path}: no {MANIFEST}; adapt re-trains on the run's own train part, which "
            "it lists"
        )


def check_train_files(manifest: Path, roles: dict) -> None:
    """Every train/val file the manifest lists must still be there (adapt trains on them)."""
    listed = [s.path for part in ("train", "val") for s in roles.get(part, [])]
    missing = [str(p) for p in listed if not p.is_file()]
    if not listed or not missing:
        return
    folder = os.path.commonpath([os.path.abspath(p) for p in missing])
    raise MissingFileError(
        f"{manifest}: {len(missing)} of the run's {len(listed)} train/val files are missing under {folder} "
        f"(e.g. {', '.join(missing[:3])}); adapt re-trains on the run's own train part: restore them "
        "(relative paths are read from the current folder)"
    )


def patient_folds(labels: np.ndarray, patients: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every film: grouped by patient, stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len({p for p, y in zip(patients, labels) if y == c}) for c in np.unique(labels)]
    if folds > min(per_class):
        raise OptionError(
            f"--folds {folds}: the sample has {min(per_class)} patients in its smallest class; "
            f"give at most {min(per_class)} folds"
        )
    fold_of = np.full(len(labels), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups=patients)):
        fold_of[held] = k
    return fold_of


def site_rows(site_idx: np.ndarray, n_train: int, weight: float) -> np.ndarray:
    """The site films repeated (each as evenly as it divides) to make `weight` of the draws
    of an epoch beside n_train films; every film at least once."""
    n = max(len(site_idx), int(round(weight / (1.0 - weight) * n_train)))
    return np.resize(site_idx, n)


# ----------------------------------------------------------------------------- training


def adapt_config(config: dict, out: Path, epochs: int, device: str | None):
    """The source run's TrainConfig with the adaptation's schedule: the run's recipe,
    options and lr, `epochs` from its weights (no head-only epochs: the head is trained);
    what the run resolved from auto is resolved again for this machine."""
    from pneumoscope.training.config import TrainConfig

    requested = config.get("requested", {})
    cfg = TrainConfig.from_dict(
        {**config, **{k: v for k, v in requested.items() if k != "backbone"}, "out": str(out)}
    )
    if device:
        cfg.device = device
    return replace(cfg, epochs=epochs, head_epochs=0, warmup_epochs=WARMUP_FRACTION * epochs)


def with_site(train: DecodedSet, site: DecodedSet, rows: np.ndarray) -> DecodedSet:
    """The epoch's train set: the run's train part, then the site films at `rows`."""
    return DecodedSet(
        images=np.concatenate([train.images, site.images[rows]]),
        samples=train.samples + [site.samples[i] for i in rows],
        failures=[],
        keys=train.keys + [site.keys[i] for i in rows],
    )


def train_adapted(
    cfg,
    run: RunDir,
    env,
    source_state: dict,
    train: DecodedSet,
    site: DecodedSet,
    site_idx: np.ndarray,
    weight: float,
    val: DecodedSet,
    show_progress: bool,
):
    """The source model re-trained as `train` does (its loop, recipe and early stopping on
    the run's validation part) on train + site films; returns (loop.Training, rows)."""
    from pneumoscope.models import build_model
    from pneumoscope.tasks import n_classes
    from pneumoscope.training import loop
    from pneumoscope.training.distributed import Replicas
    from pneumoscope.training.inputs import make_inputs
    from pneumoscope.training.step import BatchFeed, prepare_model

    model = build_model(
        cfg.backbone, weights="none", dropout=cfg.dropout, n_classes=n_classes(cfg.task)
    )
    model.load_state_dict(source_state)
    model = prepare_model(model, env.device)
    rows = site_rows(site_idx, len(train.samples), weight)
    mixed = with_site(train, site, rows)
    opt = loop.build_optimization(cfg, model, mixed, env)
    state = loop.restore(None, run, env, model, opt)
    # each cached once
    inputs = make_inputs(
        cfg,
        model,
        mixed,
        val,
        env.device,
        feed=BatchFeed(mixed.images, mixed.labels, env.device),
        replicas=Replicas(model, env, compile_model=cfg.compile),
        precision=cfg.precision,
        predict=lambda m: loop.predict_all(m, val.images, env.device, env),
        show_progress=show_progress,
        train_parts=[("train", train, None), ("site", site, rows)],
    )
    training = loop.Training(cfg, run, env, model, inputs, opt, state, mixed, val, show_progress)
    loop.run_epochs(training)
    return training, rows


def best_scores(model, run: RunDir, images: np.ndarray, device) -> np.ndarray:
    """p(pneumonia) of images by the run's best epoch, as predict computes it."""
    import torch

    from pneumoscope.inference import predict_probs
    from pneumoscope.rundir import load_model_weights

    model.load_state_dict(load_model_weights(run / BEST_MODEL))
    return predict_probs(model.to(memory_format=torch.channels_last), images, device=device)


# ----------------------------------------------------------------------------- the verb


def adapt_run(
    run_dir: str | Path,
    site_dir: str | Path,
    out: str | Path,
    *,
    site_weight: float = DEFAULT_SITE_WEIGHT,
    folds: int = DEFAULT_FOLDS,
    epochs: int = DEFAULT_EPOCHS,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    device: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Adapt RUN_DIR to the site sample SITE_DIR into the new run directory OUT; returns the
    record also written to OUT/adapt.json. A refused call writes nothing."""
    started = time.perf_counter()
    run_dir, out, source = Path(run_dir), Path(out), RunDir(run_dir)
    check_options(site_weight, folds, epochs, target_sensitivity)
    config = source.read_config()
    check_source(source, config)
    check_out(run_dir, out, overwrite)
    # --strict: the train part too
    cfg = replace(adapt_config(config, out, epochs, device), strict=strict)
    from pneumoscope.training import loop
    from pneumoscope.training.distributed import init_from_env

    env = init_from_env(cfg.device)
    loop.resolve_config(cfg, env, saved=None)  # this machine's precisions and engine
    # too small: refused here
    site = read_site_sample(site_dir, cfg.image_size, strict, show_progress)
    roles = read_manifest(source / MANIFEST)
    check_train_files(source / MANIFEST, roles)
    # three-class: the folds stratified on normal / bacterial / viral, read from the names as train does
    fold_of = patient_folds(
        task_labels(site.samples, cfg.task), [s.patient for s in site.samples], folds, seed
    )
    remove_stale_staging(out)
    staging = out.parent / f".{out.name}.adapting-{os.getpid()}"
    created_parent = not out.parent.exists()
    staging.mkdir(parents=True)
    try:
        record = _adapt_into(
            RunDir(staging),
            run_dir,
            site_dir,
            out,
            cfg,
            env,
            config,
            roles,
            site,
            fold_of,
            dict(
                site_weight=site_weight,
                folds=folds,
                epochs=epochs,
                seed=seed,
                target_sensitivity=target_sensitivity,
                n_boot=n_boot,
            ),
            show_progress,
            started,
        )
        if out.exists():  # --overwrite (check_out refused it otherwise)
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent:  # the folder NEW_RUN was to go in, if adapt made it and it is empty
            with contextlib.suppress(OSError):
                out.parent.rmdir()
        raise
    update_model_card(out)  # after the move: the card names the run's own folder
    return record


def remove_stale_staging(out: Path) -> None:
    """Staging folders of adapts into OUT that were killed (SIGKILL/SIGTERM skip the cleanup):
    their process is gone, so nothing will finish them."""
    for old in out.parent.glob(f".{out.name}.adapting-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _adapt_into(
    run: RunDir,
    run_dir: Path,
    site_dir,
    out: Path,
    cfg,
    env,
    config: dict,
    roles: dict,
    site: DecodedSet,
    fold_of: np.ndarray,
    opts: dict,
    show_progress: bool,
    started: float,
) -> dict:
    from pneumoscope.inference import Predictor
    from pneumoscope.rundir import load_model_weights
    from pneumoscope.tasks import BINARY, relabel
    from pneumoscope.training import loop

    train, val = loop.load_data(
        cfg,
        run,
        env,
        config.get("requested", {}),
        (roles["train"], roles["val"]),
        resumed=False,
        show_progress=show_progress,
    )
    task_site = (
        site if cfg.task == BINARY else replace(site, samples=relabel(site.samples, cfg.task))
    )
    source_state = load_model_weights(RunDir(run_dir).best_model_path())
    source_p = Predictor.from_run(run_dir, device=str(env.device)).predict_images(
        site.images, show_progress
    )
    oof = np.full(len(site.samples), np.nan)
    for k in tqdm(
        range(opts["folds"]), desc="adapt cross-validation", unit="fold", disable=not show_progress
    ):
        fold_run = RunDir(run.path / "folds" / f"fold{k + 1}")
        fold_run.path.mkdir(parents=True)
        # only the model is kept: the fold's images, feed and optimizer go before the next fold
        model = train_adapted(
            cfg,
            fold_run,
            env,
            source_state,
            train,
            task_site,
            np.flatnonzero(fold_of != k),
            opts["site_weight"],
            val,
            show_progress,
        )[0].model
        held = np.flatnonzero(fold_of == k)
        oof[held] = best_scores(model, fold_run, site.images[held], env.device)
        log.info(
            "fold %d/%d: %d films of %d patients held out and scored",
            k + 1,
            opts["folds"],
            len(held),
            len({site.samples[i].patient for i in held}),
        )
        shutil.rmtree(fold_run.path)
    shutil.rmtree(run.path / "folds")
    cv = cross_validation_figures(site, fold_of, oof, source_p, opts)
    # summary.json's train_wall_seconds: the final model's training
    final_started = time.perf_counter()
    training, rows = train_adapted(
        cfg,
        run,
        env,
        source_state,
        train,
        task_site,
        np.arange(len(site.samples)),
        opts["site_weight"],
        val,
        show_progress,
    )
    unique = DecodedSet(
        images=site.images[:0],
        samples=train.samples + task_site.samples,
        failures=train.failures + site.failures,
    )
    summary = loop.write_summary(replace(training, train_set=unique), final_started)
    record = adaptation_record(
        run_dir, site_dir, out, site, fold_of, oof, source_p, cv, opts, rows, summary
    )
    record["seconds"] = round(time.perf_counter() - started, 1)
    write_run_files(run, out, config, roles, train, val, site, record)
    return record


def cross_validation_figures(
    site: DecodedSet, fold_of: np.ndarray, oof: np.ndarray, source_p: np.ndarray, opts: dict
) -> dict:
    """The source model and the adapted one on the same films, each at the site rule chosen
    on its own scores (the adapted model's: the pooled OOF scores)."""
    y = site.labels  # pneumonia vs normal, whatever the task
    patients = [s.patient for s in site.samples]
    target = opts["target_sensitivity"]

    def figures(p: np.ndarray) -> dict:
        threshold = site_threshold(y, p, target)
        return {
            "site_threshold": threshold,
            "metrics": site_metrics(y, p, threshold, patients, opts["n_boot"]),
        }

    groups = [{p for p, f in zip(patients, fold_of) if f == k} for k in range(opts["folds"])]
    return {
        "folds": opts["folds"],
        "seed": opts["seed"],
        "grouped_by": "patient",
        "stratified_by": "class",
        "fold_sizes": [int(np.sum(fold_of == k)) for k in range(opts["folds"])],
        "patients_per_fold": [len(g) for g in groups],
        "target_sensitivity": target,
        "threshold_rule": (
            f"site: highest threshold whose sensitivity on the scores reaches {target:g}, "
            "chosen on the same scores it is measured on"
        ),
        "source": figures(source_p),
        "adapted_oof": figures(oof),
        "note": CV_NOTE,
    }


def adaptation_record(
    run_dir: Path,
    site_dir,
    out: Path,
    site: DecodedSet,
    fold_of: np.ndarray,
    oof: np.ndarray,
    source_p: np.ndarray,
    cv: dict,
    opts: dict,
    rows: np.ndarray,
    summary: dict,
) -> dict:
    """adapt.json: the source, the sample (with each film's fold and scores), the weighting,
    the schedule, the CV figures."""
    sample = sample_record(site_dir, site, run_dir)
    for row, fold, p_oof, p_src in zip(sample["files"], fold_of, oof, source_p):
        row.update(fold=int(fold) + 1, p_adapted_oof=float(p_oof), p_source=float(p_src))
    n_train = summary["n_train"] - len(site.samples)
    return {
        "adapted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out": str(out.resolve()),
        "source": {
            "run": str(run_dir.resolve()),
            "model_sha256": file_sha256(RunDir(run_dir).best_model_path()),
        },
        "sample": sample,
        "site_weight": {
            "share_of_each_epoch": opts["site_weight"],
            "site_draws_per_epoch": int(len(rows)),
            "train_part_films": int(n_train),
            # above the asked share when the sample is too large for it (every film once)
            "actual_share": round(len(rows) / (len(rows) + n_train), 4),
            "how": "site films repeated in every epoch's pool (each copy draws its own view)",
        },
        "schedule": {
            "epochs": opts["epochs"],
            "warmup_fraction": WARMUP_FRACTION,
            "from": "the source run's model_best weights",
            "recipe": "the source run's config.json",
            "selection": "best epoch by ROC AUC on the source run's validation part",
        },
        "final": {
            "best_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"],
            "val_roc_auc": summary["val_roc_auc"],
        },
        "cross_validation": cv,
    }


def write_run_files(
    run: RunDir,
    out: Path,
    config: dict,
    roles: dict,
    train: DecodedSet,
    val: DecodedSet,
    site: DecodedSet,
    record: dict,
) -> None:
    """config.json (the source's, with the adaptation), manifest.csv (the site films in the
    train part: the final model trained on them), threshold.json's site rule, adapt.json."""
    cv = record["cross_validation"]
    run.write_config(
        {
            **config,
            "out": str(out),
            "adapted": {
                "source_run": record["source"]["run"],
                "source_model_sha256": record["source"]["model_sha256"],
                "sample": record["sample"]["data"],
                "n": record["sample"]["n"],
                "record": ADAPT,
            },
        }
    )
    write_manifest(
        run / MANIFEST,
        {"train": roles["train"] + site.samples, "val": roles["val"]},
        sha1=sha1_by_path(train, val, site),
    )
    thresholds = read_json(run / THRESHOLD)
    chosen = cv["adapted_oof"]
    thresholds["site"] = {
        "rule": (
            f"highest threshold whose sensitivity on the site sample reaches {cv['target_sensitivity']:g} "
            "(label = PNEUMONIA if p >= threshold), chosen on the pooled out-of-fold scores of adapt's "
            f"{cv['folds']}-fold cross-validation"
        ),
        "chosen_by": "adapt",
        "target_sensitivity": cv["target_sensitivity"],
        "threshold": chosen["site_threshold"],
        "calibrated_at": record["adapted_at"],
        "sample": record["sample"],
        "metrics": chosen["metrics"],
        "previous_default": {
            "rule": thresholds["default"],
            "threshold": float(thresholds["rules"][thresholds["default"]]),
        },
        "note": CV_NOTE,
    }
    thresholds["rules"][SITE_RULE] = chosen["site_threshold"]
    thresholds.update(default=SITE_RULE, threshold=chosen["site_threshold"])
    atomic_write_json(run / THRESHOLD, thresholds)
    atomic_write_json(run / ADAPT, record)


def format_adapt(record: dict) -> str:
    """The console table: the source and the adapted model on the sample, CV figures."""
    cv, sample = record["cross_validation"], record["sample"]
    n = ", ".join(f"{c} {k}" for c, k in sample["n"].items())
    lines = [
        f"site sample (selection, n={sum(sample['n'].values())}: {n}, {sample['patients']} patients): "
        f"{sample['data']}",
        f"{cv['folds']}-fold cross-validation grouped by patient, stratified by class; site threshold at "
        f"sensitivity >= {cv['target_sensitivity']:g}, chosen on the same scores",
        f"{'model':<22}{'ROC AUC [95% CI]':<24}{'threshold':>10}{'accuracy':>10}{'sensitivity':>13}"
        f"{'specificity':>13}",
    ]
    for name, key in (("source run", "source"), ("adapted (out-of-fold)", "adapted_oof")):
        m, ci = cv[key]["metrics"], cv[key]["metrics"].get("ci95", {}).get("roc_auc")
        auc = f"{m['roc_auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(
            f"{name:<22}{auc:<24}{cv[key]['site_threshold']:>10.4f}{m['accuracy']:>10.3f}"
            f"{m['sensitivity']:>13.3f}{m['specificity']:>13.3f}"
        )
    w = record["site_weight"]
    lines += [
        f"site weight {w['actual_share']:g} ({w['site_draws_per_epoch']} site draws per epoch beside "
        f"{w['train_part_films']} train films), {record['schedule']['epochs']} epoch(s) from the source "
        f"weights; final model: best epoch {record['final']['best_epoch']}, validation ROC AUC "
        f"{record['final']['val_roc_auc']:.4f}; {record['seconds']:.0f} s",
        f"note: {cv['note']}",
    ]
    return "\n".join(lines)
