"""build.build_model: built on the meta device, sharded, then materialised and initialised shard by shard, in
real gloo process groups of 1 and 2 processes (CPU). The weights must not depend on the world size, and must equal
the plain unsharded initialisation bit for bit; HF weights load into the shards; the 32B flavor builds without
memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import resource
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.distributed.tensor import DTensor

from recipes import build, parallel
from recipes.build import model_shape
from recipes.config import TrainingConfig, load_config
from recipes.errors import UserError
from recipes.qwen3.hf import save_hf_checkpoint
from recipes.qwen3.model import Qwen3Model, flavor_config, rope_cache

SEED = 7
TRAINING = TrainingConfig(seed=SEED, dtype="float32")


def _join(rank: int, world: int, store: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _leave() -> None:
    """Ends a worker as train.run ends: the process group's gloo threads can outlive destroy_process_group and abort
    the interpreter's finalization (SIGABRT, seen on torch 2.14.1), so the worker leaves without finalizing."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _full_state(model) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def _build_and_save(
    rank: int, world: int, store: str, out: str, init_from: str, tied: bool, ac: str, replicate: int
) -> None:
    _join(rank, world, store)
    shape = dataclasses.replace(flavor_config("debug"), tie_embeddings=tied)
    mesh = parallel.device_mesh(replicate, torch.device("cpu"))
    model = build.build_model(
        shape, dataclasses.replace(TRAINING, activation_checkpoint=ac), init_from, torch.device("cpu"), mesh
    )
    state = {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in _full_state(model).items()}
    facts = {
        "state": state,
        "rope": model.rope.clone(),
        "tied": model.output.weight is model.tok_embeddings.weight,
        "local_rows": model.tok_embeddings.weight.to_local().shape[0],
        "params": model.num_params(),
    }
    tokens = torch.randint(0, shape.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)  # every rank the same rows: FSDP gathers each block's shards for the forward
    facts["kept_gathered"] = not isinstance(model.layers["0"].attention.wq.weight, DTensor)
    if rank == 0:
        torch.save({**facts, "tokens": tokens, "logits": logits}, out)
    _leave()


def build_in_processes(
    tmp_path: Path, world: int, init_from: str = "", tied: bool = True, ac: str = "none", replicate: int = 1
) -> dict:
    out = tmp_path / f"world{world}-{bool(init_from)}-{tied}-{ac}-{replicate}.pt"
    store = tmp_path / f"store-{out.stem}"
    mp.start_processes(
        _build_and_save,
        args=(world, str(store), str(out), init_from, tied, ac, replicate),
        nprocs=world,
        start_method="spawn",
        join=True,
    )
    return torch.load(out)


def plain_model(tied: bool = True) -> Qwen3Model:
    model = Qwen3Model(dataclasses.replace(flavor_config("debug"), tie_embeddings=tied))
    model.init_weights(seed=SEED)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_meta_build_equals_the_plain_init_at_every_world_size(tmp_path, tied):
    one, two = (build_in_processes(tmp_path, world, tied=tied) for world in (1, 2))
    plain = plain_model(tied)
    expected = {name: p.detach() for name, p in plain.named_parameters()}
    assert two["local_rows"] < one["local_rows"]  # two processes really held half each
    # a block's gathered parameters outlive its forward only where there is nothing to gather (one rank)
    assert one["kept_gathered"] and not two["kept_gathered"]
    for result in (one, two):
        assert result["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(result["state"][name], tensor), name
        assert result["tied"] is tied
        assert torch.equal(
            result["rope"], rope_cache(plain.config.head_dim, plain.config.max_seq_len, plain.config.rope_theta)
        )
        assert result["params"] == plain.num_params()


def test_replicas_of_one_rank_each_keep_their_blocks_gathered_and_the_same_model(tmp_path):
    result = build_in_processes(tmp_path, 2, replicate=2)  # HSDP: 2 replicas, a shard group of one rank each
    assert result["kept_gathered"]
    assert result["local_rows"] == result["state"]["tok_embeddings.weight"].shape[0]  # nothing sharded
    for name, tensor in plain_model().named_parameters():
        assert torch.equal(result["state"][name], tensor.detach()), name


@pytest.mark.parametrize("tied, ac", [(True, "none"), (False, "none"), (True, "selective")])
def test_hf_weights_load_into_the_shards(tmp_path, tied, ac, randomize_norms):
    source = plain_model(tied)
    randomize_norms(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not what build_model's own init would give
    save_hf_checkpoint(source, tmp_path / "hf")
    result = build_in_processes(tmp_path, 2, init_from=str(tmp_path / "hf"), tied=tied, ac=ac)
    for name, tensor in source.named_parameters():
        assert torch.equal(result["state"][name], tensor.detach()), name
    # and the sharded model's logits, at world size 2, are transformers' for the same folder
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], hf(result["tokens"]).logits, rtol=1e-5, atol=1e-5)


def _adamw_steps(rank: int, world: int, store: str, out: str) -> None:
    """Two AdamW steps over the FSDP2 (DTensor) parameters of the debug model, fused and foreach."""
    _join(rank, world, store)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(rank))
    results = {"start": _full_state(build.build_model(flavor_config("debug"), TRAINING, "", torch.device("cpu")))}
    for implementation in ("fused", "foreach"):
        model = build.build_model(flavor_config("debug"), TRAINING, "", torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **{implementation: True})
        for _ in range(2):
            model(tokens).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results[implementation] = _full_state(model)
        results["dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    if rank == 0:
        torch.save(results, out)
    _leave()


def test_fused_adamw_steps_dtensor_shards_as_foreach_does(tmp_path):
    """torch 2.11's fused AdamW (what build_optimizer picks on CUDA) on FSDP2's DTensor shards, world size 2."""
    out, store = tmp_path / "adamw.pt", tmp_path / "store-adamw"
    mp.start_processes(_adamw_steps, args=(2, str(store), str(out)), nprocs=2, start_method="spawn", join=True)
    result = torch.load(out)
    assert result["dtensor"]
    for name, start in result["start"].items():
        assert not torch.equal(result["fused"][name], start), name  # the step moved every parameter
        torch.testing.assert_close(result["fused"][name], result["foreach"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_float8_converts_the_blocks_linears_or_says_what_is_missing(monkeypatch):
    model = Qwen3Model(flavor_config("debug"))
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(
            UserError,
            match=r"^training.float8: torchao does not import .*; pip install '\.\[float8\]' "
            r"\(torchao 0.18\), or set training.float8 = false$",
        ):
            build.apply_float8(model.layers)
        return
    build.apply_float8(model.layers)
    converted = {name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"}
    assert converted == {
        f"layers.{i}.{part}"
        for i in range(2)
        for part in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }
    assert type(model.output) is torch.nn.Linear  # the head stays: the loss uses its weight directly
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # and where it does not import, one line says so
    with pytest.raises(UserError, match=r"^training.float8: torchao does not import"):
        build.apply_float8(Qwen3Model(flavor_config("debug")).layers)


def _build_32b(rank: int, world: int, store: str, out: str) -> None:
    _join(rank, world, store)
    shape = model_shape(load_config(None, ["--model.flavor", "32B"]), eos_id=0)
    with torch.device("meta"):
        model = Qwen3Model(shape)
    build.apply_fsdp(model, torch.bfloat16)
    local = sum(p.to_local().numel() for p in model.parameters())
    if rank == 0:
        peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.save(
            {
                "params": model.num_params(),
                "local": local,
                "peak_rss": peak_rss_bytes,
                "meta": all(p.to_local().is_meta for p in model.parameters()),
            },
            out,
        )
    _leave()


def test_the_32b_flavor_builds_and_shards_without_memory(tmp_path):
    out, store = tmp_path / "32b.pt", tmp_path / "store-32b"
    mp.start_processes(_build_32b, args=(2, str(store), str(out)), nprocs=2, start_method="spawn", join=True)
    result = torch.load(out)
    # Qwen3-32B's published count: 32.8B parameters, untied head.
    assert 32.7e9 < result["params"] < 32.9e9, result["params"]
    assert result["local"] * 2 >= result["params"] and result["meta"]
    model_bytes = result["params"] * 4  # what materialising it in float32 would take
    assert result["peak_rss"] < model_bytes / 50, f"peak RSS {result['peak_rss'] / 2**30:.1f} GiB"
    print(
        f"32B: {result['params'] / 1e9:.2f}B parameters; peak RSS of rank 0 {result['peak_rss'] / 2**30:.2f} GiB",
        file=sys.stderr,
    )
