"""torchrun / DistributedDataParallel glue: one process per device, PyTorch's own engine.

`torchrun --nproc-per-node N -m weakseg train-cam CONFIG` (or `run`, `infer-cam`) starts N
processes with RANK / WORLD_SIZE / LOCAL_RANK set. `setup()` joins them into one process group
(nccl on CUDA, gloo on CPU); without those variables everything here is a no-op, so the same
code is the single-process path.

What is split across ranks, and how (docs/architecture.md, "Distributed"):

- Training: every rank draws the same seeded global batch order and takes its own slice of
  each global batch (`local_slice`); DDP averages the gradients. The loss of a rank is scaled
  by its share of the global batch (`loss_scale`), so the averaged gradient is the gradient of
  the global batch mean even when the last batch does not split evenly.
- Inference and pseudo-labels: each rank handles the images `shard(n)` (every world-th one),
  writes their files and accumulates their metric counts; the integer counts are summed
  over the ranks (`sum_counts`), so the metrics equal one process's exactly.
- Files that describe the run (checkpoints, logs, records, metrics) are written by rank 0.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


def requested() -> bool:
    """True when started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    """Join the process group once, when launched with WORLD_SIZE > 1 (idempotent)."""
    if not requested() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; before `setup()`, the one torchrun gave it (RANK), so files a
    step writes before training starts are already written by rank 0 alone."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device_for(name: str) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def shard(count: int) -> range:
    """The indices of `count` items this rank handles: rank, rank + world, ..."""
    return range(rank() if active() else 0, count, world_size())


def local_slice(batch: Sequence[int]) -> list[int]:
    """This rank's part of a global batch (every world-th sample from its rank on)."""
    return list(batch[rank() if active() else 0::world_size()])


def loss_scale(local: int, global_: int) -> float:
    """Factor on a rank's mean loss so that DDP's average of the ranks' gradients equals the
    gradient of the mean over the global batch: (1/W) sum_r (n_r W / N) g_r = sum_r n_r g_r / N."""
    return local * world_size() / global_ if global_ else 0.0


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input itself is left alone)."""
    out = values.detach().clone()
    if active():
        backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        out = out.to(backend_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def summed(value):
    """An integer count (numpy array or int) summed over the ranks, exactly; the value itself
    in one process."""
    if not active():
        return value
    if isinstance(value, np.ndarray):
        return all_sum(torch.from_numpy(np.ascontiguousarray(value))).numpy()
    return int(all_sum(torch.tensor([int(value)], dtype=torch.int64))[0])


def sum_counts(owner: object, names: Sequence[str]) -> None:
    """Replace each named count of `owner` by its sum over the ranks: accumulators over
    disjoint image shards then hold the whole dataset's counts (e.g. SegEvaluator.COUNTS,
    ThresholdSweep's `cms`)."""
    for name in names:
        setattr(owner, name, summed(getattr(owner, name)))


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not manage (a loss term's own ones)."""
    if not active():
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` when distributed, else `model` itself. Unused parameters are looked
    for, because the methods' outputs do not all feed every loss configuration."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
