"""Run by test_distributed.py under torchrun: `pneumoscope train` with the same arguments,
left after STOP_AFTER_EPOCHS epochs as a killed run would be (for testing --resume).
Not a test module itself (pytest collects test_*.py only)."""

import os
import sys

from pneumoscope.cli import build_parser
from pneumoscope.training import TrainConfig, train

args = build_parser().parse_args(sys.argv[1:])
cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
train(cfg, resume=args.resume, show_progress=False, stop_after_epochs=int(os.environ["STOP_AFTER_EPOCHS"]))
