"""Command line: argument parsing only; each verb calls one function that does the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pneumoscope import __version__
from pneumoscope.errors import UserError


def _add_threshold_rule(p) -> None:
    from pneumoscope.evaluation.threshold_rules import DEFAULT_THRESHOLD_RULE, SENSITIVITY_RULES

    # Not argparse choices: the rules are the run's (site exists after calibrate); an
    # unknown one is refused by OperatingPoint.threshold_for, naming the run's rules.
    p.add_argument(
        "--threshold-rule",
        metavar="RULE",
        help=f"operating threshold from the run's threshold.json: youden, "
        f"{', '.join(SENSITIVITY_RULES)} (chosen on validation), site (after `calibrate`); "
        f"default: the run's default, named in its threshold.json (site once calibrated, "
        f"else {DEFAULT_THRESHOLD_RULE} for a run trained by this version)",
    )


def _add_strict(p) -> None:
    p.add_argument("--strict", action="store_true", help="stop if a file is unreadable")


def _add_patients(p) -> None:
    p.add_argument(
        "--patients",
        metavar="FILE.csv",
        default="",
        help="CSV with columns path (or file name) and patient: patient ids for data not "
        "named the Kermany way (every image must be listed)",
    )


def _audit_options(p) -> None:
    p.add_argument(
        "data_root",
        help="folder holding train/ (and optionally val/, test/), each with NORMAL/ and PNEUMONIA/",
    )
    p.add_argument("--json", action="store_true", help="print the audit as JSON instead of a table")
    _add_patients(p)
    p.set_defaults(func=cmd_audit)


def _train_options(p) -> None:
    from pneumoscope.training.options import add_train_arguments

    p.description = (
        "Train a classifier into a run directory. Options come from the command line, "
        "over --config FILE, over the defaults."
    )
    add_train_arguments(p)  # grouped: data, model, recipe, optimisation, run (training/options.py)
    p.set_defaults(func=cmd_train)


def _evaluate_options(p) -> None:
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--data", required=True, help="SPLIT_DIR holding NORMAL/ and PNEUMONIA/")
    p.add_argument(
        "--out", help="metrics JSON path (default RUN_DIR/metrics.json); predictions CSV beside it"
    )
    _add_threshold_rule(p)
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    _add_strict(p)
    _add_patients(p)
    _add_engine(p)
    p.set_defaults(func=cmd_evaluate)


def _add_engine(p) -> None:
    p.add_argument(
        "--engine",
        choices=["auto", "onnxruntime", "torch"],
        default=None,
        help="what scores the films: auto (default; $PNEUMOSCOPE_ENGINE) takes onnxruntime on a CPU "
        "where it is installed (the run's model exported once into RUN_DIR/engine.onnx, "
        "checked against torch), else torch",
    )


def _predict_options(p) -> None:
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument(
        "paths", nargs="*", help="image files (JPEG, PNG, DICOM) or folders (searched recursively)"
    )
    p.add_argument(
        "--files",
        metavar="LIST_TXT",
        help="also score the files listed in LIST_TXT, one path a line",
    )
    p.add_argument(
        "--out",
        help="CSV path (path, p_pneumonia, label), written batch by batch; default: print CSV",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows --out already holds (e.g. of a killed run) and score the rest",
    )
    _add_threshold_rule(p)
    _add_strict(p)
    _add_engine(p)
    p.add_argument(
        "--onnx",
        metavar="MODEL_ONNX",
        help="run this ONNX export of RUN_DIR's model with onnxruntime instead of torch "
        "(same decode; contract and thresholds from MODEL_ONNX.json)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="score with the engine quantized to int8 (onnxruntime, calibrated on the run's validation "
        "films), used only where its validation ROC AUC is within 0.001 of fp32's "
        "(RUN_DIR/engine.int8.check.json records the comparison)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="films per model call (default 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode processes (default: the cores, at most 4; 0: decode in this process)",
    )
    p.add_argument(
        "--reduced-decode",
        action="store_true",
        help="decode large JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling, at least twice the model "
        "size a side): about 2x faster decoding of full-size originals, but p(pneumonia) moves (up to "
        "0.035, mean 0.003, on upsampled films with a 224 px run; tests/data/test_decode_reduced.py); "
        "default: the exact decode training used",
    )
    p.add_argument(
        "--device", help="torch device (cpu, cuda, cuda:N); default: cuda when available"
    )
    p.set_defaults(func=cmd_predict)


def _serve_options(p) -> None:
    from pneumoscope.serve import DEFAULT_MAX_UPLOAD_BYTES
    from pneumoscope.serve.security import DEFAULT_RATE_LIMIT

    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default %(default)s; 0.0.0.0 exposes the app to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    p.add_argument(
        "--onnx",
        metavar="MODEL_ONNX",
        help="probabilities from this ONNX export (onnxruntime); Grad-CAM still uses torch",
    )
    _add_threshold_rule(p)
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest accepted upload in MiB (default %(default)s; larger: HTTP 413)",
    )
    p.add_argument(
        "--device", help="torch device (cpu, cuda, cuda:N); default: cuda when available"
    )
    _add_engine(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default %(default)s)",
    )
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        default="",
        help="comma-separated host names or addresses clients use to reach the server, beside the "
        "--host address (and localhost for a loopback bind); a request naming any other Host "
        "is refused (DNS rebinding)",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help="access token every API request must send as `Authorization: Bearer TOKEN`; required "
        "when --host is beyond loopback. Prefer the PNEUMOSCOPE_TOKEN environment variable "
        "(a command line is visible to other users of the machine)",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=DEFAULT_RATE_LIMIT,
        metavar="N",
        help="requests a minute per client address, beyond which HTTP 429 (default %(default)s; "
        "0: no limit)",
    )
    p.set_defaults(func=cmd_serve)


def _export_options(p) -> None:
    from pneumoscope.deploy.onnx_contract import DEFAULT_OPSET

    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["onnx"],
        default="onnx",
        help="export format (default %(default)s)",
    )
    p.add_argument(
        "--out", help="output file (default RUN_DIR/model.onnx); the contract goes to OUT.json"
    )
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version (default %(default)s)"
    )
    p.set_defaults(func=cmd_export)


def _ensemble_options(p) -> None:
    from pneumoscope.models.ensemble import TTA_PRESETS

    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished runs sharing one train/validation split (train them with the same --split-seed)",
    )
    p.add_argument("--out", required=True, help="the ensemble's run directory to write")
    p.add_argument(
        "--tta",
        choices=list(TTA_PRESETS),
        default="none",
        help="test-time views averaged with the members (default %(default)s; views are listed in "
        "docs/ensembles.md and recorded in config.json)",
    )
    p.set_defaults(func=cmd_ensemble)


def _report_options(p) -> None:
    p.add_argument("run_dir", help="run directory written by train")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--data", metavar="SPLIT_DIR", help="folder holding NORMAL/ and PNEUMONIA/ to report on"
    )
    where.add_argument(
        "--split",
        choices=["val", "train"],
        help="report on this part of the run's own split (RUN_DIR/manifest.csv), e.g. val",
    )
    p.add_argument(
        "--out",
        help="output folder (default RUN_DIR/report): index.html, one PNG per figure, "
        "metrics.json, embeddings.npy, embeddings_meta.csv",
    )
    _add_threshold_rule(p)
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the 95%% intervals (default %(default)s)",
    )
    p.add_argument(
        "--gradcam-per-group",
        type=int,
        default=4,
        help="Grad-CAM gallery: images per outcome (TP, FP, FN, TN) (default %(default)s)",
    )
    p.add_argument(
        "--perplexity",
        type=float,
        default=30.0,
        help="t-SNE perplexity, capped below a third of the images (default %(default)s)",
    )
    p.add_argument(
        "--drift",
        metavar="FOLDER",
        help="add a drift section: this folder of images (any layout, unlabelled) against the "
        "run's validation images, as `pneumoscope drift` measures it (drift.json)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of t-SNE and UMAP (default %(default)s)"
    )
    _add_strict(p)
    p.set_defaults(func=cmd_report)


def _explain_options(p) -> None:
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, DICOM) or folders"
    )
    p.add_argument(
        "--out", help="folder for the overlays, IMAGE_STEM_gradcam.png (default RUN_DIR/explain)"
    )
    _add_threshold_rule(p)
    p.add_argument(
        "--alpha",
        type=float,
        default=0.4,
        help="heatmap opacity over the X-ray (default %(default)s)",
    )
    _add_strict(p)
    p.set_defaults(func=cmd_explain)


def _calibrate_options(p) -> None:
    from pneumoscope.site.calibrate import DEFAULT_TARGET_SENSITIVITY, MIN_PER_CLASS

    p.add_argument("run_dir", help="run directory written by train (its threshold.json is updated)")
    p.add_argument(
        "--data",
        required=True,
        metavar="SITE_DIR",
        help=f"the site's labelled sample: SITE_DIR/NORMAL and SITE_DIR/PNEUMONIA, at least "
        f"{MIN_PER_CLASS} images each (40-100 advised)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=DEFAULT_TARGET_SENSITIVITY,
        help="the site threshold is the highest one whose sensitivity on the sample reaches "
        "this (default %(default)s)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    _add_strict(p)
    p.set_defaults(func=cmd_calibrate)


def _adapt_options(p) -> None:
    from pneumoscope.site.adapt import DEFAULT_EPOCHS, DEFAULT_FOLDS, DEFAULT_SITE_WEIGHT
    from pneumoscope.site.calibrate import DEFAULT_TARGET_SENSITIVITY, MIN_PER_CLASS

    p.add_argument("run_dir", help="run directory written by train (read only; left untouched)")
    p.add_argument(
        "--data",
        required=True,
        metavar="SITE_DIR",
        help=f"the site's labelled sample: SITE_DIR/NORMAL and SITE_DIR/PNEUMONIA, at least "
        f"{MIN_PER_CLASS} images each (40-100 advised)",
    )
    p.add_argument(
        "--out", required=True, metavar="NEW_RUN", help="the adapted run directory to write"
    )
    p.add_argument(
        "--site-weight",
        type=float,
        default=DEFAULT_SITE_WEIGHT,
        help="share of each epoch's draws that are site films (repeated) (default %(default)s)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=DEFAULT_FOLDS,
        help="cross-validation folds on the sample, grouped by patient (default %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="epochs of each re-training, from the run's weights (default %(default)s)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=DEFAULT_TARGET_SENSITIVITY,
        help="the site threshold: the highest whose sensitivity on the pooled out-of-fold scores "
        "reaches this (default %(default)s)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (default %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: as the run asked, auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in NEW_RUN")
    _add_strict(p)
    p.set_defaults(func=cmd_adapt)


def _drift_options(p) -> None:
    p.add_argument(
        "run_dir", help="run directory written by train (validation images from manifest.csv)"
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FOLDER",
        help="images in any layout (searched recursively; class folders are read as one set)",
    )
    p.add_argument("--out", help="drift JSON path (default RUN_DIR/drift.json)")
    _add_threshold_rule(p)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the cross-validation folds (default %(default)s)",
    )
    _add_strict(p)
    p.set_defaults(func=cmd_drift)


def _data_options(p) -> None:
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")
    d = verbs.add_parser(
        "download", help="fetch (resumable), check and unpack the full data set to DIR/chest_xray"
    )
    d.add_argument("--to", required=True, metavar="DIR", help="folder to download and unpack into")
    d.add_argument(
        "--source",
        choices=["mendeley", "kaggle"],
        default="mendeley",
        help="mendeley: ChestXRay2017.zip over HTTPS; kaggle: the kaggle package, with its "
        "credentials (default %(default)s)",
    )
    d.add_argument("--url", help="fetch the mendeley zip from this URL instead (a mirror)")
    d.add_argument(
        "--sha256",
        help="expected SHA-256 of the archive; a mismatch is refused "
        "(none is pinned for the Mendeley zip)",
    )
    d.add_argument("--keep-zip", action="store_true", help="keep the archive after unpacking")
    d.set_defaults(func=cmd_data_download)


# Each verb: the function adding its options, and its one-line help. A verb's options are
# built only when that verb runs (or for the whole parser: build_parser()), since some
# read their defaults from modules that import torch: `pneumoscope --help`, `--version`
# and `audit` stay fast and work without it.
VERBS = {
    "audit": (_audit_options, "counts, imbalance, unreadable files, duplicates, shared patients"),
    "train": (_train_options, "train a classifier into a run directory"),
    "evaluate": (_evaluate_options, "metrics of a trained run on a labelled folder"),
    "predict": (_predict_options, "p(pneumonia) and label for image files or folders"),
    "serve": (_serve_options, "web page and JSON API (POST /v1/predict) for a trained run"),
    "export": (_export_options, "export a run's model to ONNX with its preprocessing contract"),
    "ensemble": (
        _ensemble_options,
        "make several runs and/or test-time views one model, in a run "
        "directory every other verb reads",
    ),
    "report": (
        _report_options,
        "HTML report: metrics, ROC/PR, calibration, training curves, "
        "t-SNE/UMAP, Grad-CAM, data card",
    ),
    "explain": (_explain_options, "Grad-CAM heatmap overlay PNG and p(pneumonia) per image"),
    "calibrate": (
        _calibrate_options,
        "re-choose the operating threshold on a labelled sample of a "
        "new site (rule `site`, made the run's default)",
    ),
    "adapt": (
        _adapt_options,
        "re-train a run on its train part plus a labelled site sample into a new run "
        "(cross-validated gain on the sample, site threshold)",
    ),
    "drift": (
        _drift_options,
        "how far an unlabelled folder of images is from the run's validation "
        "images (domain AUC, score distributions, outliers)",
    ),
    "data": (_data_options, "get the data: download the full Kermany set"),
}


def build_parser(verbs: set[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `verbs`, only those verbs get their options (the
    others keep their name and help line)."""
    parser = argparse.ArgumentParser(
        prog="pneumoscope",
        description="Train, evaluate, explain and serve a chest X-ray pneumonia classifier.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, warnings only"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (options, help_text) in VERBS.items():
        # train shows every default (most come from its config and recipes)
        formatter = (
            argparse.ArgumentDefaultsHelpFormatter if name == "train" else argparse.HelpFormatter
        )
        p = sub.add_parser(name, help=help_text, formatter_class=formatter)
        if verbs is None or name in verbs:
            options(p)
    return parser


def _verb_of(argv: list[str]) -> str | None:
    """The verb a command line runs: its first word that is not an option (the top-level
    options take no value), or None (`--help`, `--version`)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# ----------------------------------------------------------------------------- verbs


def cmd_audit(args) -> int:
    from pneumoscope.data.audit import audit_root, format_audit
    from pneumoscope.data.discover import load_patients

    report = audit_root(
        args.data_root,
        show_progress=not (args.quiet or args.json),
        patients=load_patients(args.patients),
    )
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def cmd_train(args) -> int:
    from pneumoscope.api import train
    from pneumoscope.rundir import SUMMARY, read_json
    from pneumoscope.tasks import val_auc_name
    from pneumoscope.training.distributed import is_main_process
    from pneumoscope.training.options import given_options

    run = train(
        config=getattr(args, "config", None),
        resume=getattr(args, "resume", False),
        overwrite=getattr(args, "overwrite", False),
        show_progress=not args.quiet,
        **given_options(args),
    )
    if not is_main_process():  # under torchrun rank 0 speaks for all
        return 0
    summary = read_json(run / SUMMARY)
    t = summary["thresholds"]
    print(
        f"run: {run}\nbackbone: {summary['backbone']}  best epoch {summary['best_epoch']}"
        f"/{summary['epochs_run']}  val {val_auc_name(summary)} {summary['val_roc_auc']:.4f}"
    )
    print(
        "thresholds: "
        + ", ".join(f"{k}={v:.4f}" for k, v in t["rules"].items())
        + f"  (default: {t['default']})"
    )
    print(f"model card: {run / 'MODEL_CARD.md'}")
    return 0


def cmd_evaluate(args) -> int:
    from pneumoscope.report.evaluate import evaluate_run, format_evaluation

    metrics = evaluate_run(
        args.run_dir,
        args.data,
        out=args.out,
        threshold_rule=args.threshold_rule,
        strict=args.strict,
        n_boot=args.bootstrap,
        show_progress=not args.quiet,
        patients=args.patients,
        engine=args.engine,
    )
    print(format_evaluation(metrics))
    print(f"written: {args.out or Path(args.run_dir) / 'metrics.json'}")
    return 0


def cmd_predict(args) -> int:
    from pneumoscope.deploy.archive import predict_archive
    from pneumoscope.errors import OptionError

    if not args.paths and not args.files:
        raise OptionError("name image files or folders, or --files LIST_TXT")
    if args.batch_size is not None and args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    summary = predict_archive(
        args.run_dir,
        args.paths,
        out=args.out,
        files_list=args.files,
        resume=args.resume,
        threshold_rule=args.threshold_rule,
        strict=args.strict,
        engine=args.engine,
        batch_size=args.batch_size,
        workers=args.workers,
        reduced=args.reduced_decode,
        device=args.device,
        onnx=args.onnx,
        int8=args.int8,
        show_progress=not args.quiet,
    )
    if args.out:
        kept = f" (+{summary.resumed} already there)" if summary.resumed else ""
        print(f"{summary.scored} predictions written to {args.out}{kept} [{summary.engine}]")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from pneumoscope.serve import create_app
    from pneumoscope.serve.engine import InferenceEngine
    from pneumoscope.serve.security import serving_token

    token = serving_token(args.host, args.token)  # before the model loads: a refusal costs nothing
    # Load the model before the server starts, so a bad run or ONNX file is one line here.
    engine = InferenceEngine(
        args.run_dir, args.onnx, args.threshold_rule, args.device, engine=args.engine
    )
    hosts = tuple(h for h in args.allowed_hosts.split(",") if h.strip())
    app = create_app(
        args.run_dir,
        engine=engine,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        host=args.host,
        allowed_hosts=hosts,
        token=token,
        rate_limit=args.rate_limit,
    )
    print(
        f"pneumoscope serving {args.run_dir} on http://{args.host}:{args.port}/  (API: /openapi.json)"
    )
    print(
        f"access: {'token required (Authorization: Bearer ...)' if token else 'no token: loopback only'}; "
        f"rate limit: {f'{args.rate_limit} requests a minute per client' if args.rate_limit else 'none'}; "
        "uploads are read in memory, never written to disk"
    )
    # proxy_headers off: uvicorn would otherwise take a loopback caller's X-Forwarded-For as its
    # address, and the rate limit (and the access log) would key on what the caller wrote
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=False)
    return 0


def cmd_export(args) -> int:
    from pneumoscope.commands import export_run
    from pneumoscope.deploy.onnx_contract import contract_path

    out = export_run(args.run_dir, args.fmt, out=args.out, opset=args.opset)
    print(f"written: {out}\ncontract: {contract_path(out)}")
    return 0


def cmd_ensemble(args) -> int:
    from pneumoscope.tasks import val_auc_name
    from pneumoscope.training.ensembling import build_ensemble

    summary = build_ensemble(args.run_dirs, args.out, tta=args.tta, show_progress=not args.quiet)
    t = summary["thresholds"]
    print(
        f"ensemble: {args.out}\n{len(summary['members'])} member(s) x {summary['n_views']} view(s) "
        f"= {summary['forward_passes_per_image']} forward passes per image; val "
        f"{val_auc_name(summary)} {summary['val_roc_auc']:.4f} "
        f"on {summary['n_val']} images"
    )
    print(
        "thresholds: "
        + ", ".join(f"{k}={v:.4f}" for k, v in t["rules"].items())
        + f"  (default: {t['default']})"
    )
    return 0


def cmd_report(args) -> int:
    from pneumoscope.report import build_report

    index = build_report(
        args.run_dir,
        args.data,
        args.out,
        split=args.split,
        threshold_rule=args.threshold_rule,
        n_boot=args.bootstrap,
        per_group=args.gradcam_per_group,
        perplexity=args.perplexity,
        seed=args.seed,
        strict=args.strict,
        show_progress=not args.quiet,
        drift=args.drift,
    )
    print(f"report: {index}")
    return 0


def cmd_explain(args) -> int:
    from pneumoscope.commands import predictions_csv
    from pneumoscope.report import explain_images

    rows = explain_images(
        args.run_dir,
        args.images,
        args.out,
        threshold_rule=args.threshold_rule,
        alpha=args.alpha,
        strict=args.strict,
        show_progress=not args.quiet,
    )
    predictions_csv(rows, sys.stdout, header=["path", "p_pneumonia", "label", "overlay"])
    return 0


def cmd_calibrate(args) -> int:
    from pneumoscope.site.calibrate import calibrate_run, format_site

    site = calibrate_run(
        args.run_dir,
        args.data,
        target_sensitivity=args.target_sensitivity,
        n_boot=args.bootstrap,
        strict=args.strict,
        show_progress=not args.quiet,
    )
    print(format_site(site))
    print(
        f"written: {Path(args.run_dir) / 'threshold.json'} (default rule: site; "
        "--threshold-rule youden picks the validation one)"
    )
    return 0


def cmd_adapt(args) -> int:
    from pneumoscope.api import adapt
    from pneumoscope.rundir import ADAPT
    from pneumoscope.site.adapt import format_adapt

    out = adapt(
        args.run_dir,
        args.data,
        args.out,
        site_weight=args.site_weight,
        folds=args.folds,
        epochs=args.epochs,
        target_sensitivity=args.target_sensitivity,
        n_boot=args.bootstrap,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        strict=args.strict,
        show_progress=not args.quiet,
    )
    print(format_adapt(json.loads((out / ADAPT).read_text())))
    print(f"written: {out} (default rule: site; {ADAPT} holds the cross-validation)")
    return 0


def cmd_drift(args) -> int:
    from pneumoscope.rundir import DRIFT
    from pneumoscope.site.drift import drift_run, format_drift

    out = Path(args.out) if args.out else Path(args.run_dir) / DRIFT
    result = drift_run(
        args.run_dir,
        args.data,
        out=out,
        threshold_rule=args.threshold_rule,
        seed=args.seed,
        strict=args.strict,
        show_progress=not args.quiet,
    )
    print(format_drift(result))
    print(f"written: {out}")
    return 0


def cmd_data_download(args) -> int:
    from pneumoscope.data.download import download

    root = download(
        args.to,
        args.source,
        url=args.url,
        sha256=args.sha256,
        keep_zip=args.keep_zip,
        show_progress=not args.quiet,
    )
    print(f"data: {root}  (train with: pneumoscope train --data {root} --out RUN_DIR)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser({_verb_of(argv)}).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (
        UserError
    ) as err:  # a mistake the user can fix: one line; anything else is a bug (traceback)
        verb = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"pneumoscope {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; `--resume` continues a training run from its last finished epoch",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
