"""The whole tiny model on each backend against a float64 run of the same weights; the mutation; torchtitan parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from recipes.qwen3.attention import BACKENDS, MASKS
from recipes.qwen3.model import Qwen3Config, Qwen3Model, flavor_config
from recipes.qwen3.mutation import inject_varlen_layout_mistake

EOS = 7
SEQ = 48


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _logits_and_grads(model: Qwen3Model, tokens: torch.Tensor):
    model.zero_grad()
    logits = model(tokens)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def _float64_reference(model: Qwen3Model, reference_attention) -> Qwen3Model:
    """The same weights in float64, attention replaced by the naive reference under the model's mask."""
    reference = copy.deepcopy(model).double()
    reference.backend = reference_attention(model.config.mask)
    for layer in reference.layers.values():
        layer.attention.backend = reference.backend
    return reference


def _errors_against_float64(model, tokens, reference_attention) -> dict[str, float]:
    logits, grads = _logits_and_grads(model, tokens)
    want_logits, want_grads = _logits_and_grads(_float64_reference(model, reference_attention), tokens)
    errors = {"logits": _relative_error(logits, want_logits)}
    errors.update({name: _relative_error(grads[name], want_grads[name]) for name in grads})
    return errors


def _debug_model(attention: str, mask: str) -> Qwen3Model:
    model = Qwen3Model(flavor_config("debug", attention=attention, mask=mask, eos_id=EOS))
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("attention", BACKENDS)
def test_backend_model_matches_float64(attention, mask, packed_tokens, reference_attention):
    model = _debug_model(attention, mask)
    tokens = packed_tokens(SEQ, model.config.vocab_size, EOS)
    errors = _errors_against_float64(model, tokens, reference_attention)
    assert len(errors) == 1 + len(list(model.parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def test_agreement_check_catches_the_varlen_layout_mistake(packed_tokens, reference_attention):
    """The check above, run on torchtitan 0.2.1's varlen mistake, must fail by a wide margin."""
    model = inject_varlen_layout_mistake(_debug_model("varlen", "document"))
    tokens = packed_tokens(SEQ, model.config.vocab_size, EOS)
    errors = _errors_against_float64(model, tokens, reference_attention)
    assert min(errors.values()) > 0.1, "logits and every gradient should be off by more than 10%"


def test_mutation_refuses_other_backends():
    with pytest.raises(ValueError, match="varlen"):
        inject_varlen_layout_mistake(_debug_model("sdpa", "causal"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_dicts_interchange_with_torchtitan(tied, randomize_norms):
    titan = pytest.importorskip("torchtitan.models.qwen3")  # absent, or needs triton, on newer torch
    shape = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=160,
                 max_seq_len=64, rope_theta=10000.0, norm_eps=1e-6)
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
