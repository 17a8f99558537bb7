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
from recipes.errors import UserError
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
    if training.float8:
        apply_float8(model.layers)
    if training.activation_checkpoint != "none":
        apply_activation_checkpointing(model, training.activation_checkpoint)
    if training.compile:
        apply_compile(model, training.compile_mode)
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

    save = {torch.ops.aten.mm.default, torch.ops.aten._scaled_mm.default,  # the latter: training.float8
            torch.ops._c10d_functional.reduce_scatter_tensor.default, *ATTENTION_OPS}
    apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option="op"), op_sac_save_list=save)


def apply_float8(blocks: torch.nn.Module) -> None:
    """torchao's float8 training for the linear layers of `blocks`, tensorwise scales (measured on an H200: 1.27x on
    the blocks' matmuls at 1.7B, 1.37x at 4B; 0.98x at 0.6B; rowwise lost at every size). The output head stays
    bfloat16: the fused loss uses its weight directly."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise UserError(f"training.float8: torchao does not import ({error}); pip install torchao==0.18.0, or set "
                        "training.float8 = false") from None
    convert_to_float8_training(blocks, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))


def apply_compile(model: torch.nn.Module, mode: str = "default") -> None:
    """Compile block by block: every block has the same graph, so one compilation serves all of them."""
    for block in model.layers.values():
        block.compile(fullgraph=True, mode=mode)


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


def step_stats(loss: torch.Tensor, grad_norm: torch.Tensor, signalled: bool) -> tuple[float, float, bool]:
    """One all-reduce and one host sync: (loss averaged over ranks, grad norm, whether any rank was signalled)."""
    world = dist.get_world_size()
    stats = torch.stack([loss.float(), grad_norm.float() / world, torch.tensor(float(signalled), device=loss.device)])
    dist.all_reduce(stats)
    loss_mean, norm, flags = stats.tolist()
    return loss_mean / world, norm, flags > 0
