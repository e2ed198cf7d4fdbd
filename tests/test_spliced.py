"""Spliced-in CE / KL scores against an independent computation on tiny random models.

The reference (eval_helpers.reference_spliced) splices by wrapping the hooked module's `forward`
(not with forward hooks, as the library does) and computes CE and KL with torch's own loss
functions; the gradient reference goes through `output_hidden_states` with `retain_grad`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eval_helpers import reference_spliced
from lightning_sae.sae import TopKSAE
from lightning_sae.spliced import TOTAL_FIELDS, scores_from_totals, spliced_metrics, spliced_totals

BOS, VOCAB, D = 1, 64, 32
# Weights larger than the default 0.02 make the output depend strongly on the hooked activation,
# so the CE differences the scores divide are far above float32 rounding.


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=BOS, initializer_range=0.3)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=3, n_head=4, bos_token_id=BOS, eos_token_id=2, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def contexts(batch: int = 5, length: int = 12) -> Tensor:
    tokens = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = BOS
    tokens[1, 6] = BOS  # a BOS inside a context too: it must keep its clean activation
    return tokens


def random_sae() -> TopKSAE:
    sae = TopKSAE(D, 64, k=4, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    return sae


CASES = [
    ("llama", llama, lambda m: m.model.layers[1], "resid_post"),
    ("gpt2", gpt2, lambda m: m.transformer.h[1].mlp, "mlp_out"),
]


@pytest.mark.parametrize("family,build,module_of,hook", CASES, ids=[c[0] for c in CASES])
def test_ce_loss_score_matches_independent_computation(family, build, module_of, hook):
    model, tokens, sae = build(), contexts(), random_sae()
    with torch.no_grad():
        got = spliced_metrics(model, tokens, 1, hook, lambda x, grad: sae(x).xhat, batch_size=2)
        expected = reference_spliced(model, module_of(model), tokens, lambda rows: sae(rows).xhat, BOS)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
    assert 0 < got["kl_div_with_ablation"] and got["ce_loss_with_sae"] != got["ce_loss_without_sae"]  # a real test


def test_identity_scores_one_and_zero_reconstruction_scores_zero():
    model, tokens = llama(), contexts()
    identity = spliced_metrics(model, tokens, 1, "resid_post", lambda x, grad: x)
    assert identity["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert identity["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert identity["ce_loss_with_sae"] == pytest.approx(identity["ce_loss_without_sae"], abs=1e-6)
    # Zero ablation zeroes every position, BOS included (SAELens's convention), so only a zero
    # reconstruction spliced in at every position reproduces it.
    zero = spliced_metrics(model, tokens, 1, "resid_post", lambda x, grad: torch.zeros_like(x), exclude_bos=False)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    bos_kept = spliced_metrics(model, tokens, 1, "resid_post", lambda x, grad: torch.zeros_like(x))
    assert bos_kept["ce_loss_with_sae"] != pytest.approx(bos_kept["ce_loss_with_ablation"], rel=1e-3)


def test_gradient_given_to_reconstruction_is_dloss_dx_and_parameters_stay_untouched():
    model, tokens = llama(), contexts(batch=3)
    # Reference gradient: the loss summed over every prediction (the activation cache's
    # convention), differentiated with respect to layer 1's output via output_hidden_states.
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = out.hidden_states[2]  # hidden_states[0] is the embedding, [l + 1] layer l's output
    hidden.retain_grad()
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    expected = hidden.grad[tokens != BOS]

    seen: list[Tensor] = []

    def reconstruct(x: Tensor, grad: Tensor | None) -> Tensor:
        seen.append(grad)
        return x

    with torch.inference_mode():  # as inside a Lightning validation epoch
        spliced_metrics(model, tokens, 1, "resid_post", reconstruct, needs_gradients=True, batch_size=3)
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_without_exclude_bos_every_position_is_spliced():
    model, tokens = llama(), contexts()
    kept = spliced_metrics(model, tokens, 1, "resid_pre", lambda x, grad: torch.zeros_like(x))
    spliced_all = spliced_metrics(model, tokens, 1, "resid_pre", lambda x, grad: torch.zeros_like(x), exclude_bos=False)
    rows: list[int] = []
    spliced_metrics(model, tokens, 1, "resid_pre", lambda x, grad: rows.append(len(x)) or x, exclude_bos=False)
    assert rows == [tokens.numel()]
    assert spliced_all["ce_loss_with_sae"] != pytest.approx(kept["ce_loss_with_sae"])
    # and the predictions made at BOS positions count in the means
    assert spliced_all["ce_loss_without_sae"] != pytest.approx(kept["ce_loss_without_sae"])


def test_totals_of_shares_add_up_to_the_whole():
    """What ranks of a distributed run rely on: summing per-share totals gives the whole's scores."""
    model, tokens, sae = gpt2(), contexts(batch=6), random_sae()
    recon = {"": lambda x, grad: sae(x).xhat}
    whole = spliced_totals(model, tokens, 1, "resid_post", recon)[""]
    shares = sum(spliced_totals(model, tokens[rank::2], 1, "resid_post", recon)[""] for rank in range(2))
    torch.testing.assert_close(shares, whole)
    # Predictions made at BOS positions are not counted: 5 BOS among these contexts' tokens, none
    # of them in the last column (which has no target, so counts for KL only).
    bos = int((tokens == BOS).sum())
    assert whole[TOTAL_FIELDS.index("ce_tokens")] == tokens.shape[0] * (tokens.shape[1] - 1) - bos
    assert whole[TOTAL_FIELDS.index("kl_tokens")] == tokens.numel() - bos
    for name, value in scores_from_totals(whole).items():
        assert scores_from_totals(shares)[name] == pytest.approx(value)


def test_empty_share_gives_nan_scores_not_an_error():
    scores = scores_from_totals(torch.zeros(len(TOTAL_FIELDS), dtype=torch.float64))
    assert all(math.isnan(value) for value in scores.values())


def test_chunked_forwards_and_softmax_give_the_same_totals_and_gradients():
    """A tiny logits budget (one context per forward, three positions per softmax chunk) changes
    how the work is cut, not the sums, nor the dL/dx handed to a gradient-using reconstruction."""
    model, tokens, sae = llama(), contexts(), random_sae()
    seen: dict[str, list[Tensor]] = {"whole": [], "chunked": []}

    def recorder(key: str):
        def reconstruct(x: Tensor, grad: Tensor | None) -> Tensor:
            seen[key].append(grad)
            return sae(x).xhat

        return reconstruct

    whole = spliced_totals(model, tokens, 1, "resid_post", {"": recorder("whole")}, needs_gradients=True)[""]
    chunked = spliced_totals(model, tokens, 1, "resid_post", {"": recorder("chunked")}, needs_gradients=True,
                             max_logits_bytes=4 * 3 * 4 * VOCAB)[""]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert len(seen["whole"]) == 1 and len(seen["chunked"]) == tokens.shape[0]
    torch.testing.assert_close(torch.cat(seen["chunked"]), seen["whole"][0], rtol=1e-5, atol=1e-7)


def test_progress_bar_is_shown_when_asked(capsys):
    model, tokens = llama(), contexts()
    spliced_metrics(model, tokens, 1, "resid_post", lambda x, grad: x, progress=True)
    shown = capsys.readouterr().err
    assert "spliced CE/KL" in shown and f"0/{tokens.shape[0]}" in shown
    spliced_metrics(model, tokens, 1, "resid_post", lambda x, grad: x, progress=False)
    assert "spliced CE/KL" not in capsys.readouterr().err
