"""Training: configuration, the loop, checkpoints and resume.

`fit` (training.loop.fit: a TrainConfig in, a finished run directory out; the public
`pneumoscope.api.train` wraps it) loads lazily: the CLI parser reads TrainConfig
without importing torch."""

from pneumoscope.training.config import TrainConfig

__all__ = ["TrainConfig", "fit"]


def __getattr__(name: str):
    if name == "fit":
        from pneumoscope.training.loop import fit

        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
