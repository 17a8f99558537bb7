"""Process group and collectives: joining torchrun's group (or a one-process one), the device mesh (HSDP),
rank-0-first blocks, gradient clipping and the one all-reduce of each step's statistics (read without a sync).

The same code runs on CUDA with NCCL and on CPU with gloo; a plain `python train.py` gets a one-process group,
so world size 1 and N take the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from recipes.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Joins torchrun's process group (env://) or makes a one-process one; picks NCCL+cuda or gloo+cpu."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    communication = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(communication, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(communication, store=dist.HashStore(), rank=0, world_size=1)
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def device_mesh(replicate: int, device: torch.device) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: None (every rank, plain FSDP) for one replica, else HSDP's 2-D mesh of
    `replicate` replicas x the ranks that shard within each; 0 replicas = one per node (torchrun's LOCAL_WORLD_SIZE
    ranks shard, so parameter gathers stay on the node and only gradients cross nodes)."""
    world = dist.get_world_size()
    if replicate == 0:
        replicate = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if replicate == 1:
        return None
    if world % replicate:
        raise UserError(
            f"parallel.replicate: {replicate} replicas do not divide world size {world}; choose a "
            "divisor of it, or 0 for one replica per node"
        )
    log.info("HSDP: %d replicas x %d ranks sharding each", replicate, world // replicate)
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first (e.g. filling a cache), then the other ranks run it."""
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class StepStats:
    """A step's statistics, all-reduced on the device, then copied to the host without waiting: the caller launches
    the optimizer's step before it reads them, so the GPU goes on from the backward to the step while the host waits
    for these four numbers alone. `values` (on the device): the step's loss (the sum of the ranks' parts of the
    mean: loss.mean_loss), the grad norm, whether any rank was signalled, the sum of the ranks' step seconds."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor, signalled: bool, seconds: float):
        device = loss.device
        self.world = dist.get_world_size()
        self.values = torch.stack(  # torch.full, not torch.tensor: no host-to-device copy, which would wait
            [
                loss.float(),
                grad_norm.float() / self.world,
                torch.full((), float(signalled), device=device),
                torch.full((), seconds, device=device),
            ]
        )
        dist.all_reduce(self.values)
        self._host = self.values.to("cpu", non_blocking=True)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        if self._copied is not None:
            self._copied.record()

    def read(self) -> tuple[float, float, bool, float]:
        """(loss, grad norm, any rank signalled, seconds averaged over ranks): the same on every rank."""
        if self._copied is not None:
            self._copied.synchronize()
        loss, norm, flags, seconds_sum = self._host.tolist()
        return loss, norm, flags > 0, seconds_sum / self.world


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank: a collective, so every rank must call it at the same point."""
    stats = torch.tensor([float(flag)], device=device)
    dist.all_reduce(stats)
    return stats.item() > 0
