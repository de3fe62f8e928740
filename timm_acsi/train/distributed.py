"""One process or many (torchrun): where this process stands, collectives, and samplers that shard the data."""

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "RunError",
    "init_distributed",
    "on_rank0",
    "DistributedWeightedSampler",
    "ShardSampler",
    "class_balanced_weights",
]

T = TypeVar("T")
#: Errors rank 0 may hit while deciding for every rank (run folder, resume state); they are shared with the
#: other ranks, which would otherwise wait forever in the next collective.
SHARED_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


@dataclass
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RunError(RuntimeError):
    """A run cannot start or continue (raised on every rank of a distributed run)."""


def resolve_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """The torch device for ``device`` (default: ``cuda:LOCAL_RANK`` if a GPU is present, else cpu), checked.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"Unknown device {device!r} ({e}): use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine (or its torch build) has no CUDA GPU: use --device cpu.")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} GPUs (cuda:0 ...).")
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (if any) and pick
    the device: nccl on CUDA, gloo on CPU. A single process needs no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, dev)


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run on rank 0, its result given to every rank.

    An error of ``fn`` is raised on every rank (as :class:`RunError` in a distributed run), so that no process
    waits forever for the others; a single process gets the original exception.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except SHARED_ERRORS as e:
            if not info.distributed:
                raise
            error = str(e)
    error = broadcast(error, info)
    if error:
        raise RunError(error)
    return broadcast(result, info)


def all_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum over ranks (float64 / int64 on the process group's device)."""
    if not info.distributed:
        return values
    comm = values.to(info.device)
    dist.all_reduce(comm)
    return comm.cpu()


def all_gather(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj``, in rank order."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running stats drift apart: each rank updates them on its batches)."""
    if info.distributed:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded over ranks.

    Each epoch every rank draws the same ``num_samples`` indices from a generator seeded with
    ``seed + epoch`` and keeps every ``num_replicas``-th one from its rank: together the ranks draw one
    weighted sample of the whole set, as a single-process ``WeightedRandomSampler`` would.
    """

    def __init__(
        self,
        weights: Sequence[float],
        num_samples: Optional[int] = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        total = len(self.weights) if num_samples is None else num_samples
        self.num_samples = math.ceil(total / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(indices[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample on exactly one rank, no padding."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def class_balanced_weights(targets: Sequence[int], num_classes: int) -> List[float]:
    """Sample weights ``1 / count(class)``: every class is drawn equally often in expectation."""
    counts = torch.bincount(torch.as_tensor(targets), minlength=num_classes).tolist()
    return [1.0 / counts[t] for t in targets]
