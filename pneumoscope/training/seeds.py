"""Per-purpose random streams of a training run, all derived from its one --seed.

Each purpose (the epoch order, dropout, the on-the-fly augmentation, the cpu-fast views
and the view each epoch picks) draws from its own stream: the child
``numpy.random.SeedSequence(seed, spawn_key=(purpose, *keys))``, i.e. what
``SeedSequence(seed).spawn`` hands out, keyed by epoch, view or rank. Streams of different
purposes, epochs or seeds never coincide (the old ``seed * K + epoch`` seeds did: with
seed 0 order, dropout and augmentation drew the same numbers), and every stream is a
function of (seed, purpose, keys) only, so ``--resume`` repeats an epoch exactly.
"""

from __future__ import annotations

import numpy as np
import torch

# Fixed numbers, not list positions: adding a purpose must not move the others' streams.
PURPOSES = {"init": 0, "order": 1, "dropout": 2, "augment": 3, "views": 4, "view_choice": 5}


def stream_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for (seed, purpose, keys), e.g. ("augment", epoch, rank)."""
    sequence = np.random.SeedSequence(seed, spawn_key=(PURPOSES[purpose], *keys))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU torch.Generator on the stream of (seed, purpose, keys)."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose, *keys))


def seed_global(seed: int, purpose: str, *keys: int) -> None:
    """Seed torch's global generator (what dropout and weight init draw from) on a stream."""
    torch.manual_seed(stream_seed(seed, purpose, *keys))
