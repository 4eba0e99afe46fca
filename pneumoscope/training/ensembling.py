"""`pneumoscope ensemble RUN_A [RUN_B ...] --out ENS_DIR [--tta none|zoom3|...]`: several
finished runs and a set of test-time views become one run directory.

ENS_DIR has the files every verb reads from a run (rundir.py), so evaluate, predict,
report, serve, export, calibrate and drift work on it unchanged:

    config.json       kind "ensemble"; members (path, backbone, dropout, sha256 of the
                      weights they came from), the views, image_size, preprocessing;
                      task "three-class" for three-class members (binary: no task key,
                      as before --task)
    model_best.safetensors  the Ensemble's state_dict (members.{i}.*): the directory is
                      self-contained, a member run moved or retrained later changes nothing
    manifest.csv      the members' common split (copied from the first member)
    threshold.json, val_predictions.csv  chosen on the ensemble's own validation
                      probabilities, by the same code as training (training.outputs.write_selection;
                      three-class: the (N,3) class probabilities and the three-class labels)
    summary.json      members, views, validation ROC AUC (three-class: the macro
                      one-vs-rest ROC AUC and the task, as train's summary)

Members must share their task (binary or three-class) and their patient-grouped split
(the same files in train and in val, by manifest): thresholds are chosen on the common
validation part, and a member that trained on another member's validation images would
make it optimistic. Train members with `--split-seed` to vary their seeds but keep the
split.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from pneumoscope.data.cache import decode_samples, require_both_classes
from pneumoscope.data.manifest import files_by_role, read_manifest
from pneumoscope.errors import OptionError
from pneumoscope.fsio import atomic_write_bytes, atomic_write_json, file_sha256
from pneumoscope.inference import load_trained_model, predict_class_probs
from pneumoscope.models.ensemble import Ensemble, tta_views
from pneumoscope.rundir import BEST_MODEL, MANIFEST, SUMMARY, RunDir, save_model_weights
from pneumoscope.tasks import BINARY, relabel, task_of

log = logging.getLogger(__name__)

COMBINE = "mean of the members' and views' softmax probabilities (see models/ensemble.py)"


class EnsembleError(OptionError):
    """Runs that cannot form an ensemble (another split, another input size, ...)."""


def split_of(run_dir: Path) -> dict[str, frozenset]:
    path = run_dir / MANIFEST
    if not path.exists():
        raise EnsembleError(
            f"{run_dir}: no {MANIFEST}; cannot check that it shares the members' split"
        )
    return files_by_role(path)


def check_members(run_dirs: list[Path], configs: list[dict]) -> None:
    """Refuse ensembles of ensembles, of another task than the first member's (the Ensemble
    averages one set of class probabilities), of other input sizes, or of runs with another
    split, naming the run that differs from the first."""
    for run_dir, config in zip(run_dirs, configs):
        if config.get("kind") == "ensemble":
            raise EnsembleError(f"{run_dir}: is an ensemble itself; give its member runs instead")
    first, size, task = run_dirs[0], int(configs[0]["image_size"]), task_of(configs[0])
    split = split_of(first)
    for run_dir, config in zip(run_dirs, configs):
        if task_of(config) != task:
            raise EnsembleError(
                f"{run_dir}: is a {task_of(config)} run, {first} a {task} run; "
                "members share one task (--task)"
            )
        if int(config["image_size"]) != size:
            raise EnsembleError(
                f"{run_dir}: image size {config['image_size']} differs from {first}'s {size}; "
                "members share one input"
            )
        other = split_of(run_dir)
        if other != split:
            diff = {
                role: len(other.get(role, frozenset()) ^ split.get(role, frozenset()))
                for role in set(other) | set(split)
            }
            raise EnsembleError(
                f"{run_dir}: its train/validation split differs from {first}'s ("
                + ", ".join(f"{n} {role} files differ" for role, n in sorted(diff.items()) if n)
                + "); members must share the split (train them with the same --split-seed "
                "and data)"
            )


def member_record(run_dir: Path, config: dict) -> dict:
    weights = RunDir(run_dir).best_model_path()
    return {
        "run_dir": str(run_dir.resolve()),
        "backbone": config["backbone"],
        "dropout": config.get("dropout", 0.0),
        "seed": config.get("seed"),
        "weights_file": weights.name,
        "weights_sha256": file_sha256(weights),
    }


def build_ensemble(
    run_dirs: list[str | Path], out: str | Path, tta: str = "none", show_progress: bool = True
) -> dict:
    """Write ENS_DIR from finished runs (see the module docstring); returns the summary."""
    from pneumoscope.training.loop import validation_metrics
    from pneumoscope.training.outputs import write_selection

    run_dirs, out = [Path(r) for r in run_dirs], Path(out)
    if not run_dirs:
        raise EnsembleError("an ensemble needs at least one run directory")
    if out.resolve() in {r.resolve() for r in run_dirs}:
        raise EnsembleError(f"{out}: --out must be a new directory, not one of the members")
    configs = [RunDir(r).read_config() for r in run_dirs]
    check_members(run_dirs, configs)
    views = tta_views(tta)
    size, task = int(configs[0]["image_size"]), task_of(configs[0])
    recorded = {"task": task} if task != BINARY else {}  # binary ensembles' files stay as they were
    model = Ensemble(
        [load_trained_model(RunDir(r), c) for r, c in zip(run_dirs, configs)], views, size
    )
    model = model.to(memory_format=torch.channels_last)  # the layout Predictor runs it in

    val = read_manifest(run_dirs[0] / MANIFEST)["val"]
    data = decode_samples(val, size, desc="decode val", show_progress=show_progress, report=False)
    require_both_classes({"validation": data})
    # three-class: 0 normal, 1 bacterial, 2 viral
    data = replace(data, samples=relabel(data.samples, task))
    probs = predict_class_probs(
        model, data.images, show_progress=show_progress, desc="ensemble val"
    )

    members = [member_record(r, c) for r, c in zip(run_dirs, configs)]
    run = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)
    run.write_config(
        {
            "kind": "ensemble",
            **recorded,
            "backbone": "ensemble(" + " + ".join(m["backbone"] for m in members) + f"; tta {tta})",
            "weights": "members' model_best.safetensors",
            "image_size": size,
            "preprocessing": configs[0].get("preprocessing", {}),
            "members": members,
            "tta": {"preset": tta, "views": views},
            "combine": COMBINE,
        }
    )
    atomic_write_bytes(out / MANIFEST, (run_dirs[0] / MANIFEST).read_bytes())
    save_model_weights(run / BEST_MODEL, model.state_dict(), {"kind": "ensemble", "tta": tta})
    thresholds = write_selection(run, data, probs, task)
    summary = {
        "kind": "ensemble",
        "members": [m["run_dir"] for m in members],
        "tta": tta,
        "n_views": len(views),
        "forward_passes_per_image": len(members) * len(views),
        # binary: ROC AUC of p(pneumonia); three-class: macro one-vs-rest, as train's summary
        "val_roc_auc": validation_metrics(data.labels, probs)["val_roc_auc"],
        "n_val": len(data.samples),
        "thresholds": thresholds,
        **recorded,
    }
    atomic_write_json(out / SUMMARY, summary)
    return summary
