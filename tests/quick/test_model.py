"""The whole tiny model on each backend against a float64 run of the same weights; the mutation; torchtitan parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from recipes.qwen3.attention import BACKENDS, MASKS, build_backend
from recipes.qwen3.loss import IGNORE_INDEX
from recipes.qwen3.model import Qwen3Config, Qwen3Model, apply_rope, flavor_config, rope_cache
from recipes.qwen3.mutation import inject_varlen_layout_mistake

SEQ = 48


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _tokens(model: Qwen3Model, starts: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, starts.shape, generator=torch.Generator().manual_seed(0))


def _logits_and_grads(model: Qwen3Model, tokens: torch.Tensor, starts: torch.Tensor):
    model.zero_grad()
    logits = model(tokens, model.attention_meta(starts))
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def _float64_reference(model: Qwen3Model, reference_attention) -> Qwen3Model:
    """The same weights in float64, attention replaced by the naive reference under the model's mask."""
    reference = copy.deepcopy(model).double()
    reference.backend = reference_attention(model.config.mask)
    for layer in reference.layers.values():
        layer.attention.backend = reference.backend
    return reference


def _errors_against_float64(model, starts, reference_attention) -> dict[str, float]:
    tokens = _tokens(model, starts)
    logits, grads = _logits_and_grads(model, tokens, starts)
    want_logits, want_grads = _logits_and_grads(_float64_reference(model, reference_attention), tokens, starts)
    errors = {"logits": _relative_error(logits, want_logits)}
    errors.update({name: _relative_error(grads[name], want_grads[name]) for name in grads})
    return errors


def _debug_model(attention: str, mask: str) -> Qwen3Model:
    model = Qwen3Model(flavor_config("debug", attention=attention, mask=mask))
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("attention", BACKENDS)
def test_backend_model_matches_float64(attention, mask, packed_starts, reference_attention):
    model = _debug_model(attention, mask)
    errors = _errors_against_float64(model, packed_starts(SEQ), reference_attention)
    assert len(errors) == 1 + len(list(model.parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def test_agreement_check_catches_the_varlen_layout_mistake(packed_starts, reference_attention):
    """The check above, run on torchtitan 0.2.1's varlen mistake, must fail by a wide margin."""
    model = inject_varlen_layout_mistake(_debug_model("varlen", "document"))
    errors = _errors_against_float64(model, packed_starts(SEQ), reference_attention)
    assert min(errors.values()) > 0.1, "logits and every gradient should be off by more than 10%"


def test_mutation_refuses_other_backends():
    with pytest.raises(ValueError, match="varlen"):
        inject_varlen_layout_mistake(_debug_model("sdpa", "causal"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_dicts_interchange_with_torchtitan(tied, randomize_norms):
    titan = pytest.importorskip("torchtitan.models.qwen3")  # absent, or needs triton, on newer torch
    shape = dict(
        vocab_size=300,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        hidden_dim=160,
        max_seq_len=64,
        rope_theta=10000.0,
        norm_eps=1e-6,
    )
    theirs = titan.Qwen3Model(titan.Qwen3ModelArgs(**shape, attn_type="sdpa", enable_weight_tying=tied))
    ours = Qwen3Model(Qwen3Config(**shape, tie_embeddings=tied, attention="sdpa", mask="causal"))
    tokens = torch.randint(0, shape["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    with torch.no_grad():
        theirs.init_weights()
    randomize_norms(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-5, atol=1e-5)

    ours.init_weights(seed=1)
    randomize_norms(ours, seed=1)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs(tokens), ours(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_loss_from_labels_equals_cross_entropy_of_the_logits(tied, packed_starts):
    """model(tokens, meta, labels): the summed cross-entropy over the labels that are not IGNORE_INDEX, with the
    same gradients as F.cross_entropy on the full logits (the fused loss never holds them whole)."""
    model = Qwen3Model(flavor_config("debug", attention="varlen", mask="document", tie_embeddings=tied))
    model.init_weights(seed=0)
    starts = packed_starts(SEQ)
    tokens = _tokens(model, starts)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 3] = IGNORE_INDEX
    meta = model.attention_meta(starts)
    fused = model(tokens, meta, labels)
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(tokens, meta).flatten(0, 1), labels.flatten(), reduction="sum")
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_rope_positions_per_row_equal_positions_per_document(packed_starts):
    """Under the document mask, RoPE at row positions and RoPE restarted at each document give the same attention:
    q_i·k_j depends on positions only through i - j, and i, j always lie in one document. docs/attention.md."""
    config = flavor_config("debug")
    starts = packed_starts(SEQ)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(3, SEQ, heads, config.head_dim, generator=generator)
        for heads in (config.n_heads, config.n_kv_heads, config.n_kv_heads)
    )
    cache = rope_cache(config.head_dim, SEQ, config.rope_theta)
    row_starts = starts.clone()
    row_starts[:, 0] = True
    begin = torch.cummax(torch.where(row_starts, torch.arange(SEQ), 0), dim=1).values  # each token's document start
    per_document = torch.arange(SEQ) - begin  # positions restarted at every document
    assert per_document[0, -1] < SEQ - 1 and (per_document[0, 5:12] == torch.arange(7)).all()

    def rotated(x, positions):  # RoPE at arbitrary positions, row by row
        return torch.cat([_rope_at(x[b : b + 1], cache, positions[b]) for b in range(3)])

    backend = build_backend("sdpa", "document")
    meta = backend.attention_meta(starts)
    by_row = backend(apply_rope(q, cache), apply_rope(k, cache), v, meta, config.head_dim**-0.5)
    by_document = backend(rotated(q, per_document), rotated(k, per_document), v, meta, config.head_dim**-0.5)
    torch.testing.assert_close(by_document, by_row, rtol=1e-5, atol=1e-5)
    causal = build_backend("sdpa", "causal")  # without the document mask the two differ: the test can fail
    assert not torch.allclose(
        causal(rotated(q, per_document), rotated(k, per_document), v, None, 0.125),
        causal(apply_rope(q, cache), apply_rope(k, cache), v, None, 0.125),
        atol=1e-3,
    )


def _rope_at(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """apply_rope for one row (1, seq, heads, head_dim) whose tokens sit at `positions`."""
    return torch.cat([apply_rope(x[:, i : i + 1], cache[p : p + 1]) for i, p in enumerate(positions.tolist())], dim=1)


def test_activation_checkpointing_modes_give_the_same_loss_and_gradients(packed_starts):
    """none, full and selective (torchtitan's per-op SAC with every backend's attention op on its save list)
    recompute the same function: the same loss and gradients in fp32 (≤ 1e-6)."""
    from recipes.build import apply_activation_checkpointing

    starts = packed_starts(SEQ)
    results = {}
    for mode in ("none", "full", "selective"):
        model = _debug_model("varlen", "document")
        if mode != "none":
            apply_activation_checkpointing(model, mode)
        tokens = _tokens(model, starts)
        labels = tokens.roll(-1, dims=1)
        loss = model(tokens, model.attention_meta(starts), labels)
        loss.backward()
        names = [name for name, _ in model.named_parameters()]
        # equal results prove nothing unless the blocks really are wrapped (and recompute in backward)
        assert sum("._checkpoint_wrapped_module" in name for name in names) == (
            0 if mode == "none" else len([name for name in names if name.startswith("layers.")])
        ), mode
        results[mode] = (
            loss.detach(),
            {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()},
        )
    loss, grads = results["none"]
    for mode in ("full", "selective"):
        other_loss, other_grads = results[mode]
        assert other_grads.keys() == grads.keys()
        torch.testing.assert_close(other_loss, loss, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")
