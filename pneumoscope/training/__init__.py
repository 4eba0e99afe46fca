"""Training: configuration, the loop, checkpoints and resume.

`train` loads lazily: the CLI parser reads TrainConfig without importing torch."""

from pneumoscope.training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":
        from pneumoscope.training.loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
