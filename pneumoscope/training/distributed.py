"""Process-group plumbing for `torchrun ... -m pneumoscope train` (PyTorch's own DDP).

A run started by torchrun finds RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in its
environment; one started without it is a world of one, and every helper here is then a
no-op (no process group is created), so single-process training is unchanged.

Design (see docs/scale-out.md): every rank draws the same epoch order from the same
seeded generator and takes its own slice of it (`shard_order`); validation is split the
same way and the predictions are gathered back in order (`gather_by_index`), so the AUC
is computed on all predictions, identically on every rank; rank 0 alone writes files.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pneumoscope.errors import OptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (a world of one)

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """What config.json records: a resumed run must use the same world size."""
        return {"world_size": self.world_size, "backend": self.backend or "none"}

    # ------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if not self.is_distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's (picklable) object on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.is_distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_arrays(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's 1-D array (lengths may differ), in rank order, on every rank."""
        array = np.ascontiguousarray(array)
        if not self.is_distributed:
            return [array]
        dev = self._comm_device()
        length = torch.tensor([len(array)], dtype=torch.int64, device=dev)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        lengths = [int(n.item()) for n in lengths]
        # all_gather needs equal shapes: pad to the longest, trim after.
        padded = torch.zeros(max(lengths), dtype=_torch_dtype(array.dtype), device=dev)
        padded[: len(array)] = torch.from_numpy(array).to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [p[:n].cpu().numpy() for p, n in zip(parts, lengths)]

    def gather_by_index(self, values: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
        """Reassemble per-rank values (rows) of positions `indices` into one array of n rows."""
        if not self.is_distributed:
            out = np.empty((n, *values.shape[1:]), dtype=values.dtype)
            out[indices] = values
            return out
        all_idx = np.concatenate(self.all_gather_arrays(indices.astype(np.int64)))
        row = values.shape[1:]  # (N,) or (N, C): rows travel flattened
        all_val = np.concatenate(self.all_gather_arrays(values.reshape(-1))).reshape(-1, *row)
        if len(all_idx) != n or len(np.unique(all_idx)) != n:
            raise RuntimeError(
                f"gather_by_index: ranks covered {len(np.unique(all_idx))} of {n} positions"
            )
        out = np.empty((n, *row), dtype=all_val.dtype)
        out[all_idx] = all_val
        return out

    def sync_module_state(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (in place).

        DDP keeps parameters equal, but BatchNorm running statistics drift apart between
        ranks (each rank updates them from its own batches); validation and the saved
        model must all use rank 0's."""
        if not self.is_distributed:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=dtype)).dtype


# ---------------------------------------------------------------------- set-up


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device_name: str = "auto") -> DistEnv:
    """The world this process is part of; creates the process group on first call.

    device_name: auto | cpu | cuda | cuda:N. Under torchrun each rank uses GPU LOCAL_RANK
    (NCCL) when CUDA is chosen, else the CPU (gloo)."""
    if not launched_by_torchrun():
        return DistEnv(device=_single_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        if not torch.cuda.is_available():
            raise OptionError(
                f"--device {device_name}: no CUDA device on this machine (rank {rank})"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(cleanup)
    if rank != 0:
        logging.getLogger("pneumoscope").setLevel(logging.WARNING)  # one voice: rank 0's
    log.info("distributed: rank %d of %d (%s, %s)", rank, world, backend, device)
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend
    )


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (for printing once)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------- data and model


def shard_order(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of an epoch order that every rank drew identically.

    The order is padded by wrapping around to a multiple of `world` (as torch's
    DistributedSampler does), then dealt out round-robin: every rank gets the same
    number of indices, and together they hold the whole order once plus the few
    padding repeats. Because the order itself is the class-balanced draw under
    `--balance sampler`, each rank's slice is balanced too."""
    if world == 1:
        return order
    pad = (-len(order)) % world
    if pad:
        order = np.concatenate([order, np.resize(order, pad)])
    return order[rank::world]


def replicate(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """The model as the training step calls it: wrapped in DistributedDataParallel.

    DDP fixes the set of parameters it synchronises when it is built, so the caller
    builds a new wrapper whenever staged fine-tuning unfreezes stages (see `Replicas`)."""
    if not env.is_distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class Replicas:
    """Hands out the training-time model (DDP-wrapped and/or compiled), rebuilt only when
    the set of trainable parameters changes (staged fine-tuning), not every epoch."""

    def __init__(self, model: torch.nn.Module, env: DistEnv, compile_model: bool = False):
        self.model, self.env, self.compile_model = model, env, compile_model
        self._key, self._net = None, None

    def current(self) -> torch.nn.Module:
        key = tuple(p.requires_grad for p in self.model.parameters())
        if key != self._key:
            net = replicate(self.model, self.env)
            self._net = torch.compile(net) if self.compile_model else net
            self._key = key
        return self._net
