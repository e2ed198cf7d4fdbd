"""Our spliced CE/KL and reconstruction metrics against SAELens's own evaluation functions.

SAELens evaluates on TransformerLens models, which cannot load a hub model offline; so the same
tiny random GPT-2 is built twice: as a transformers model (what lightning-sae runs) and as a
TransformerLens HookedTransformer from a hand-written config with the weights converted by
TransformerLens's own GPT-2 converter. The SAE is ours, saved in SAELens's format and loaded
with `sae_lens.SAE.load_from_disk`. Then `sae_lens.evals.get_downstream_reconstruction_metrics`
and `get_sparsity_and_variance_metrics` (what `run_evals` calls), with BOS as the ignored
token, must give our numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from lightning_sae.data.hooks import ActivationRecorder, transformer_lens_name
from lightning_sae.formats import save_saelens
from lightning_sae.metrics import ReconstructionStats
from lightning_sae.sae import TopKSAE
from lightning_sae.spliced import spliced_metrics

pytest.importorskip("transformer_lens", reason="transformer_lens is not installed")
sae_lens_evals = pytest.importorskip("sae_lens.evals", reason="sae_lens is not installed")
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402

BOS, VOCAB, D, LAYERS, HEADS, CONTEXT = 1, 64, 32, 3, 4, 12
# The spliced scores carry SAELens's / SAEBench's names (issue 15).
SPLICED_NAMES = {name: name for name in (
    "ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
    "kl_div_with_sae", "kl_div_with_ablation",
)}


def twin_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # Weights larger than the default make the output depend strongly on the hooked activation.
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT,
                                    bos_token_id=BOS, eos_token_id=2, initializer_range=0.3))
    hf.eval().requires_grad_(False)
    cfg = HookedTransformerConfig(n_layers=LAYERS, d_model=D, n_ctx=CONTEXT, d_head=D // HEADS, n_heads=HEADS,
                                  d_mlp=4 * D, d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN",
                                  positional_embedding_type="standard", default_prepend_bos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is what SAELens's evals take
        tl = HookedTransformer(cfg)
    # Non-strict: the converter gives GPT-2's weights only, not TransformerLens's constant buffers
    # or the unembedding bias GPT-2 does not have (left at its initial zeros).
    missing, unexpected = tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    assert not unexpected and all(name.endswith(("IGNORE", "mask", "b_U")) for name in missing), missing
    assert not tl.unembed.b_U.any()
    return hf, tl.eval()


def batches() -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        tokens = torch.randint(3, VOCAB, (3, CONTEXT), generator=generator)
        tokens[:, 0] = BOS
        out.append(tokens)
    out[0][1, 5] = BOS  # a document boundary inside a context
    return out


class TokenBatches:
    """The one method of SAELens's ActivationsStore that its evaluation functions call here."""

    def __init__(self, batches: list[Tensor]):
        self._batches = iter(batches)

    def get_batch_tokens(self, batch_size: int) -> Tensor:
        tokens = next(self._batches)
        assert tokens.shape[0] == batch_size
        return tokens


def saelens_sae(sae: TopKSAE, kind: str, tmp_path):
    from sae_lens import SAE

    directory = save_saelens(sae, tmp_path / kind, metadata={"hook_name": transformer_lens_name(1, kind)})
    return SAE.load_from_disk(str(directory))


def random_sae() -> TopKSAE:
    sae = TopKSAE(D, 64, k=4, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    return sae


def test_twin_models_agree():
    hf, tl = twin_models()
    tokens = torch.cat(batches())
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, tl(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "resid_pre"])
def test_spliced_scores_match_saelens(kind, tmp_path):
    hf, tl = twin_models()
    sae = random_sae()
    with torch.no_grad():
        expected = sae_lens_evals.get_downstream_reconstruction_metrics(
            saelens_sae(sae, kind, tmp_path), tl, TokenBatches(batches()), ActivationScaler(),
            compute_kl=True, compute_ce_loss=True, n_batches=2, eval_batch_size_prompts=3, ignore_tokens=[BOS],
        )
    # A small logits budget: one context per forward and 5 positions per softmax chunk, so the
    # chunked arithmetic is what gets compared.
    got = spliced_metrics(hf, torch.cat(batches()), 1, kind, lambda x, grad: sae(x).xhat, bos_token_id=BOS,
                          max_logits_bytes=4 * 5 * 4 * VOCAB)
    for ours, theirs in SPLICED_NAMES.items():
        assert got[ours] == pytest.approx(expected[theirs], rel=2e-4, abs=1e-6), (ours, theirs)
    # Not vacuous: both replacements change the model's predictions well beyond rounding.
    assert abs(expected["ce_loss_with_sae"] - expected["ce_loss_without_sae"]) > 1e-3
    assert min(expected["kl_div_with_sae"], expected["kl_div_with_ablation"]) > 1e-3


def test_reconstruction_metrics_match_saelens(tmp_path):
    hf, tl = twin_models()
    sae, kind = random_sae(), "resid_post"
    expected = sae_lens_evals.get_sparsity_and_variance_metrics(
        saelens_sae(sae, kind, tmp_path), tl, TokenBatches(batches()), ActivationScaler(),
        compute_l2_norms=False, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=False, n_batches=2, eval_batch_size_prompts=3, model_kwargs={},
        ignore_tokens=[BOS],
    )[0]
    # Ours as validation sees it: the activation rows at non-BOS positions (the cache's rows).
    tokens = torch.cat(batches())
    with torch.no_grad(), ActivationRecorder(hf, 1, [kind]) as recorder:
        hf(input_ids=tokens)
    x = recorder.values[kind][tokens != BOS].float()
    code = sae.encode(x)
    stats = ReconstructionStats(D)
    stats.update(x, sae.decode(code).detach(), code.values.detach())
    got = {name: value.item() for name, value in stats.compute().items()}
    for name in ("mse", "explained_variance", "cossim", "l0"):
        assert got[name] == pytest.approx(expected[name], rel=1e-4), name
    assert got["mse_per_element"] == pytest.approx(expected["mse"] / D, rel=1e-4)

