"""Training: configuration, the loop, checkpoints and resume."""

from pneumoscope.training.config import TrainConfig
from pneumoscope.training.loop import train

__all__ = ["TrainConfig", "train"]
