"""The model, built: its shape (a flavor, or an HF checkpoint's config.json), whether it fits the data, and the
model for this process: meta device -> activation checkpointing -> compile -> FSDP2 -> materialised shards ->
initialised (or HF) weights.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from recipes.config import Config, TrainingConfig, expand_path
from recipes.errors import UserError
from recipes.qwen3.attention import ATTENTION_OPS
from recipes.qwen3.hf import load_hf_weights, read_hf_config
from recipes.qwen3.model import Qwen3Config, Qwen3Model, flavor_config

log = logging.getLogger(__name__)


def model_shape(config: Config, eos_id: int) -> Qwen3Config:
    """The one place that decides the model's shape: the flavor's, or with model.init_from the HF checkpoint's
    config.json. Returns a Qwen3Config with the run's attention backend, mask and kernel."""
    m = config.model
    overrides = dict(attention=m.attention, mask=m.mask, kernel=m.kernel, eos_id=eos_id)
    if m.init_from:
        return read_hf_config(expand_path(m.init_from), **overrides)
    return flavor_config(m.flavor, **overrides)


def check_fits(shape, seq_len: int, tokenizer) -> None:
    """Does the model fit the data: rows no longer than the model's positions, token ids inside its vocabulary."""
    if seq_len > shape.max_seq_len:
        raise UserError(f"training.seq_len: {seq_len} exceeds the model's max_seq_len {shape.max_seq_len}; lower it")
    if tokenizer.vocab_size > shape.vocab_size:
        raise UserError(
            f"data.tokenizer: vocabulary {tokenizer.vocab_size} exceeds model vocab {shape.vocab_size} "
            f"({tokenizer.name}); pick a flavor with a larger vocabulary or a smaller tokenizer "
            "(data.vocab_size for the default one)"
        )


def build_model(
    shape: Qwen3Config, training: TrainingConfig, init_from: str, device: torch.device, mesh: DeviceMesh | None = None
) -> Qwen3Model:
    """The model for this process: built on the meta device (no memory), wrapped, sharded with FSDP2 (over every
    rank, or HSDP over `mesh`), and only then materialised, so each rank allocates its shards alone; weights from
    training.seed (identical to an unsharded init, whatever the world size and layout) or from the HF checkpoint
    `init_from`, read shard by shard."""
    with torch.device("meta"):
        model = Qwen3Model(shape)
    if training.float8:
        apply_float8(model.layers)
    if training.activation_checkpoint != "none":
        apply_activation_checkpointing(model, training.activation_checkpoint)
    if training.compile:
        apply_compile(model)
    apply_fsdp(model, getattr(torch, training.dtype), mesh)
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

    save = {
        torch.ops.aten.mm.default,
        torch.ops.aten._scaled_mm.default,  # the latter: training.float8
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
        *ATTENTION_OPS,
    }
    apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option="op"), op_sac_save_list=save)


def apply_float8(blocks: torch.nn.Module) -> None:
    """torchao's float8 training for the linear layers of `blocks`, tensorwise scales (on an H200, two compiled 4B
    blocks forward + backward: 1.20x over bfloat16, docs/results.md section 5). The output head stays bfloat16: the
    fused loss uses its weight directly."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise UserError(
            f"training.float8: torchao does not import ({error}); pip install '.[float8]' (torchao 0.18), "
            "or set training.float8 = false"
        ) from None
    convert_to_float8_training(
        blocks,
        config=Float8LinearConfig.from_recipe_name("tensorwise"),
        module_filter_fn=lambda module, name: isinstance(module, torch.nn.Linear),
    )


def apply_compile(model: torch.nn.Module) -> None:
    """Compile block by block: every block has the same graph, so one compilation serves all of them."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype, mesh: DeviceMesh | None = None) -> None:
    """FSDP2: one unit per transformer block plus the root (embedding, final norm and output head). With a 2-D
    (replicate, shard) mesh it is HSDP: parameters sharded within a replica, gradients reduced across replicas.

    Tied embeddings stay in the root unit with the output head: wrapping tok_embeddings as its own unit would
    split one parameter across two FSDP groups, which torch >= 2.13 refuses.

    Gradients are summed over ranks, not averaged: each rank's loss is already its part of the mean over the whole
    step's labels (loss.mean_loss), so the sum is the mean's gradient and no world size enters. A divide factor of
    1 with sum-only collectives is a plain SUM reduce-scatter (no PREMUL_SUM, which gloo lacks).

    A block's gathered parameters are freed after its forward and gathered again for its backward only where a
    shard group has several ranks: with one, the gather is a copy in param_dtype, and keeping those copies (2 bytes a
    parameter in bf16) costs less than copying them again. They then stay gathered after a forward without backward
    (evaluation) until the next backward or state dict, so model.parameters() is not the optimizer's shards then,
    and a state dict is loaded before any forward (train.py loads at start), not after one.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    shard_group_ranks = mesh.size(-1) if mesh is not None else dist.get_world_size()  # FSDP2 shards on the last
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=shard_group_ranks > 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if dist.get_world_size() == 1:  # nothing to reduce; torch 2.11's FSDP would still divide every gradient by 1
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
