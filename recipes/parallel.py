"""Process group, and the model built for it: meta device -> activation checkpointing -> compile -> FSDP2 ->
materialised shards -> initialised (or HF) weights.

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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from recipes.config import TrainingConfig
from recipes.qwen3.attention import ATTENTION_OPS
from recipes.qwen3.hf import load_hf_weights
from recipes.qwen3.model import Qwen3Config, Qwen3Model

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


def build_model(shape: Qwen3Config, training: TrainingConfig, init_from: str, device: torch.device) -> Qwen3Model:
    """The model for this process: built on the meta device (no memory), wrapped, sharded with FSDP2, and only
    then materialised, so each rank allocates its shards alone; weights from training.seed (identical to an
    unsharded init, whatever the world size) or from the HF checkpoint `init_from`, read shard by shard."""
    with torch.device("meta"):
        model = Qwen3Model(shape)
    if training.activation_checkpoint != "none":
        apply_activation_checkpointing(model, training.activation_checkpoint)
    if training.compile:
        apply_compile(model)
    apply_fsdp(model, getattr(torch, training.dtype), device)
    model.to_empty(device=device)
    model.init_weights(seed=training.seed)
    if init_from:
        load_hf_weights(model, init_from)
        log.info("model: weights from %s (its config.json sets the shape)", init_from)
    return model


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """torchtitan's activation checkpointing, block by block: "full" recomputes each block in backward;
    "selective" (torchtitan's per-op SAC) saves the matmul outputs (every second one, as torchtitan does) and every
    attention backend's kernel output, and recomputes the rest (norms, activations, RoPE)."""
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import apply_ac

    save = {torch.ops.aten.mm.default, torch.ops._c10d_functional.reduce_scatter_tensor.default, *ATTENTION_OPS}
    apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option="op"), op_sac_save_list=save)


def apply_compile(model: torch.nn.Module) -> None:
    """Compile block by block: every block has the same graph, so one compilation serves all of them."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype, device: torch.device) -> None:
    """FSDP2: one unit per transformer block plus the root (embedding, final norm and output head).

    Tied embeddings stay in the root unit with the output head: wrapping tok_embeddings as its own unit would
    split one parameter across two FSDP groups, which torch >= 2.13 refuses.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if device.type == "cpu":
        # gloo has no PREMUL_SUM, which FSDP uses to pre-divide gradients; sum then divide instead.
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)


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


def step_stats(loss: torch.Tensor, grad_norm: torch.Tensor, signalled: bool,
               seconds: float) -> tuple[float, float, bool, float]:
    """One all-reduce and one host sync: (loss averaged over ranks, grad norm, whether any rank was signalled,
    the step's wall time averaged over ranks), the same on every rank."""
    world = dist.get_world_size()
    stats = torch.stack([loss.float(), grad_norm.float() / world, torch.tensor(float(signalled), device=loss.device),
                         torch.tensor(seconds, device=loss.device)])
    dist.all_reduce(stats)
    loss_mean, norm, flags, seconds_sum = stats.tolist()
    return loss_mean / world, norm, flags > 0, seconds_sum / world


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank: a collective, so every rank must call it at the same point."""
    stats = torch.tensor([float(flag)], device=device)
    dist.all_reduce(stats)
    return stats.item() > 0
