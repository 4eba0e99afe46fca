"""Run by test_distributed.py under torchrun: `pneumoscope train` with the same arguments,
left after STOP_AFTER_EPOCHS epochs as a killed run would be (for testing --resume).
Not a test module itself (pytest collects test_*.py only)."""

import os
import sys

from pneumoscope.cli import build_parser
from pneumoscope.training import TrainConfig, fit
from pneumoscope.training.options import given_options

args = build_parser().parse_args(sys.argv[1:])  # options not given are absent (the CLI's rule)
cfg = TrainConfig(**given_options(args))
fit(
    cfg,
    resume=getattr(args, "resume", False),
    show_progress=False,
    stop_after_epochs=int(os.environ["STOP_AFTER_EPOCHS"]),
)
