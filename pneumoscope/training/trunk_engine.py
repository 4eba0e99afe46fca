"""Which engine runs the cpu-fast recipe's frozen trunk pass: torch, or onnxruntime.

The trunk pass (every training image, clean and per augmented view, through the frozen
stages once) is most of a cold cpu-fast run. On CPUs without native bf16 (most laptops:
AVX2), onnxruntime runs EfficientNet-Lite's fp32 trunk about twice as fast as torch's
eager kernels (depthwise convolutions; benchmarks/RESULTS.md, "Default recipe on the full
shared split"). The graph is the FrozenTrunk itself, exported in memory, and is checked
against torch on the spot: an engine that disagrees is never used.

``--trunk-engine auto`` takes onnxruntime where it applies (a CPU, an fp32 trunk pass,
onnxruntime installed) and torch elsewhere; config.json records what ran, and the
activation cache keeps the two engines' outputs apart.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import numpy as np
import torch

from pneumoscope.errors import OptionError, UserError

TRUNK_ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 17
_CHECK_SIZE = 64  # the on-the-spot check's image side (the graph takes any size)


class TrunkEngineError(UserError, RuntimeError):
    """The exported trunk could not be built or disagrees with torch."""


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_trunk_engine(engine: str, device: torch.device, precision: str) -> str:
    """What `--trunk-engine` means here: torch or onnxruntime."""
    if engine not in TRUNK_ENGINES:
        raise OptionError(f"unknown trunk engine {engine!r}; valid: {', '.join(TRUNK_ENGINES)}")
    applies = device.type == "cpu" and precision == "fp32"
    if engine == "onnxruntime":
        if not applies:
            raise OptionError(f"--trunk-engine onnxruntime runs an fp32 trunk pass on a CPU (here: {device.type}, "
                              f"{precision}); use --trunk-engine torch or --trunk-precision fp32")
        if not onnxruntime_available():
            raise OptionError("--trunk-engine onnxruntime needs the onnxruntime package: pip install onnxruntime")
        return engine
    if engine == "auto":
        return "onnxruntime" if applies and onnxruntime_available() else "torch"
    return engine


class OnnxTrunk:
    """A FrozenTrunk as an onnxruntime session: float32 (B, 1, S, S) in [0, 1] -> float32
    (B, C, H, W), the same numbers as the torch module up to float rounding."""

    def __init__(self, trunk: torch.nn.Module, threads: int | None = None):
        from pneumoscope.onnx_predictor import open_session

        self.session = open_session(_export(trunk), threads or torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name
        _check_against(trunk, self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


def _export(trunk: torch.nn.Module) -> bytes:
    """The trunk as ONNX bytes with a dynamic batch axis. The TorchScript exporter takes a
    few seconds where the torch.export one takes tens (its deprecation note is silenced)."""
    buffer = io.BytesIO()
    example = torch.rand(2, 1, _CHECK_SIZE, _CHECK_SIZE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(trunk.cpu().eval(), (example,), buffer, input_names=["image"], output_names=["act"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as err:  # an exporter that cannot take the trunk: torch runs it instead
        raise TrunkEngineError(f"could not export the trunk to ONNX: {err}") from err
    return buffer.getvalue()


@torch.inference_mode()
def _check_against(trunk: torch.nn.Module, engine: OnnxTrunk) -> None:
    x = torch.rand(2, 1, _CHECK_SIZE, _CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    want, got = trunk.cpu().eval()(x), engine(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        raise TrunkEngineError("onnxruntime's trunk output differs from torch's")


def build_engine(trunk: torch.nn.Module, engine: str):
    """The callable that runs the trunk: the module itself (torch), or an OnnxTrunk. One
    that cannot be built stops the run before the trunk pass, saying how to go on: falling
    back quietly would make config.json and the activation cache say what did not run."""
    if engine != "onnxruntime":
        return trunk
    try:
        return OnnxTrunk(trunk)
    except TrunkEngineError as err:
        raise TrunkEngineError(f"{err}; run with --trunk-engine torch") from err
