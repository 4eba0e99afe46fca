"""Which engine runs the cpu-fast recipe's frozen trunk pass: torch, or onnxruntime.

The trunk pass (every training image, clean and per augmented view, through the frozen
stages once) is most of a cold cpu-fast run. On CPUs without native bf16 (most laptops:
AVX2), onnxruntime runs EfficientNet-Lite's fp32 trunk about twice as fast as torch's
eager kernels (depthwise convolutions; benchmarks/RESULTS.md, "Default recipe on the full
shared split"). The graph is the FrozenTrunk itself, exported in memory, and is checked
against torch on the spot: an engine that disagrees is never used.

``--trunk-engine auto`` takes onnxruntime where it applies (a CPU, an fp32 trunk pass,
onnxruntime installed) and torch elsewhere, and ``--trunk-precision auto`` makes the pass
fp32 on a CPU where it will run on onnxruntime (faster there than torch's bf16 on the one
AMX CPU measured, and torch's bf16 is slow where the CPU lacks it);
config.json records what ran, and the activation cache keeps the two engines' outputs apart.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from pneumoscope.errors import OptionError, UserError
from pneumoscope.models.precision import resolve_precision

TRUNK_ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 17
_EXAMPLE_SIZE = 64  # the export's example image side (the graph takes any size)


class TrunkEngineError(UserError, RuntimeError):
    """The exported trunk could not be built or disagrees with torch."""


def onnxruntime_available() -> bool:
    """onnxruntime imports (installed is not enough: a broken build fails on import)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:
        return False
    return True


def resolve_trunk_precision(
    precision: str, device: torch.device, saved: str | None = None, engine: str = "auto"
) -> str:
    """What `--trunk-precision` means here: fp32 or bf16. auto on a CPU is fp32 where the
    pass will run on onnxruntime (`--trunk-engine` auto or onnxruntime, and onnxruntime
    runs: its fp32 pass beat torch's bf16 one on the AMX CPU measured, benchmarks/RESULTS.md,
    "Three trainable stages"), else bf16 where the device runs it natively, else fp32; so
    `--trunk-engine torch` keeps torch's bf16 pass where it is native. saved: the trunk
    precision of the run being resumed, which auto keeps (a run goes on as it began)."""
    if precision == "auto" and saved in ("fp32", "bf16"):
        return saved
    onnx_engine = engine in ("auto", "onnxruntime")
    if precision == "auto" and device.type == "cpu" and onnx_engine and onnxruntime_available():
        return "fp32"
    return resolve_precision(precision, device, option="--trunk-precision")


def resolve_trunk_engine(
    engine: str, device: torch.device, precision: str, saved: str | None = None
) -> str:
    """What `--trunk-engine` means here: torch or onnxruntime. saved: the engine of the run
    being resumed, which `auto` keeps where it still applies (a run goes on as it began)."""
    if engine not in TRUNK_ENGINES:
        raise OptionError(f"unknown trunk engine {engine!r}; valid: {', '.join(TRUNK_ENGINES)}")
    applies = device.type == "cpu" and precision == "fp32"
    if engine == "onnxruntime":
        if not applies:
            hint = "--trunk-precision fp32" if device.type == "cpu" else "a CPU device"
            raise OptionError(
                f"--trunk-engine onnxruntime runs an fp32 trunk pass on a CPU (here: {device.type}, "
                f"{precision}); use --trunk-engine torch or {hint}"
            )
        if not onnxruntime_available():
            raise OptionError(
                "--trunk-engine onnxruntime needs the onnxruntime package (pip install onnxruntime); "
                "or use --trunk-engine torch"
            )
        return engine
    if engine == "auto":
        if saved == "torch":
            return "torch"
        return "onnxruntime" if applies and onnxruntime_available() else "torch"
    return engine


class OnnxTrunk:
    """A FrozenTrunk as an onnxruntime session: float32 (B, 1, S, S) in [0, 1] -> float32
    (B, C, H, W), the same numbers as the torch module up to float rounding. The first
    batch it runs is also run by torch and compared (at the run's own image size): an
    engine that disagrees stops the run before a single activation is stored."""

    def __init__(self, trunk: torch.nn.Module, threads: int | None = None):
        from pneumoscope.models.onnx_session import open_session

        self.trunk = trunk
        try:
            # torch augments the next batch between runs: spinning threads would take its cores
            # (11% fewer augmented images/s with spinning on the 2-core VM)
            self.session = open_session(
                _export(trunk), threads or torch.get_num_threads(), spinning=False
            )
            self.input_name = self.session.get_inputs()[0].name
        except TrunkEngineError:
            raise
        except (
            Exception
        ) as err:  # onnxruntime's own errors (a graph it cannot load, a broken install)
            raise TrunkEngineError(f"onnxruntime could not load the exported trunk: {err}") from err
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = torch.from_numpy(
                self.session.run(
                    None,
                    {
                        self.input_name: np.ascontiguousarray(
                            x.detach().cpu().numpy(), dtype=np.float32
                        )
                    },
                )[0]
            )
        except Exception as err:
            raise TrunkEngineError(
                f"onnxruntime failed on the trunk pass: {err}; run with --trunk-engine torch"
            ) from err
        if not self.checked:
            _check_against(self.trunk, x[:2], out[:2])
            self.checked = True
        return out


def _export(trunk: torch.nn.Module) -> bytes:
    """The trunk as ONNX bytes with dynamic batch and size axes. The TorchScript exporter
    takes a few seconds where the torch.export one takes tens; its deprecation note is
    silenced, and where a later torch has dropped it, the torch.export one is used."""
    buffer = io.BytesIO()
    example = torch.zeros(2, 1, _EXAMPLE_SIZE, _EXAMPLE_SIZE)
    trunk = trunk.cpu().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                trunk,
                (example,),
                buffer,
                input_names=["image"],
                output_names=["act"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
                opset_version=OPSET,
                dynamo=False,
            )
        return buffer.getvalue()
    except Exception as first:
        try:
            program = torch.onnx.export(
                trunk,
                (example,),
                None,
                input_names=["image"],
                output_names=["act"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            return program.model_proto.SerializeToString()
        except Exception as err:
            raise TrunkEngineError(f"could not export the trunk to ONNX: {first}; {err}") from err


@torch.inference_mode()
def _check_against(trunk: torch.nn.Module, x: torch.Tensor, got: torch.Tensor) -> None:
    want = trunk(x.to(next(trunk.parameters()).device)).float().cpu()
    if want.shape != got.shape or not torch.allclose(
        want, got, rtol=1e-3, atol=1e-3 * float(want.abs().max())
    ):
        raise TrunkEngineError(
            "onnxruntime's trunk output differs from torch's; run with --trunk-engine torch"
        )


def build_engine(trunk: torch.nn.Module, engine: str):
    """The callable that runs the trunk: the module itself (torch), or an OnnxTrunk. One
    that cannot be built or disagrees with torch stops the run before any activation is
    stored, saying how to go on: falling back quietly would make config.json and the
    activation cache say what did not run."""
    if engine != "onnxruntime":
        return trunk
    try:
        return OnnxTrunk(trunk)
    except TrunkEngineError as err:
        raise TrunkEngineError(f"{err}; run with --trunk-engine torch") from err
