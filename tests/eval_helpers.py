"""A tiny local language model, tokenizer, corpus and SAE for the evaluation tests (no hub)."""

from __future__ import annotations

import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_sae.formats import save_saelens
from lightning_sae.sae import TopKSAE

D_IN, D_SAE, K, LAYER, HOOK, CONTEXT = 32, 96, 6, 1, "resid_post", 16
_WORDS = (
    "the a one two model layer token sparse feature vector river mountain city garden red green blue "
    "reads writes learns finds small large old new and or but while after before . , ; <angle> & \"q\""
).split()


@dataclass
class TinySetup:
    root: Path
    model_dir: Path
    corpus: Path
    sae_dir: Path
    cache_dir: Path

    def data_args(self) -> list[str]:
        """`lightning-sae` arguments for an ActivationDataModule on these files."""
        options = {
            "model": self.model_dir, "dataset": self.corpus, "layer": LAYER, "hook": HOOK,
            "context_size": CONTEXT, "num_tokens": CONTEXT * 96, "validation_fraction": 0.25,
            "batch_size": 64, "device": "cpu", "model_dtype": "float32", "cache_dir": self.cache_dir, "shard_tokens": CONTEXT * 32,
        }
        return ["--data=lightning_sae.data.ActivationDataModule"] + [f"--data.{k}={v}" for k, v in options.items()]

    def datamodule_kwargs(self) -> dict:
        args = self.data_args()[1:]
        return {match[1]: _parse(match[2]) for match in (re.match(r"--data\.(\w+)=(.*)", a) for a in args)}


def _parse(value: str):
    return int(value) if value.isdigit() else float(value) if re.fullmatch(r"\d+\.\d+", value) else value


def paths(root: Path) -> TinySetup:
    """Where build(root) puts everything."""
    return TinySetup(root, root / "model", root / "corpus.txt", root / "sae", root / "cache")


def build(root: Path) -> TinySetup:
    """Writes the model, tokenizer, corpus and a random SAE under `root` (the cache is made by
    whatever first uses the DataModule)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(400)]
    tiny = paths(root)
    corpus = tiny.corpus
    corpus.write_text("\n".join(lines) + "\n")

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")

    torch.manual_seed(0)
    # initializer_range 0.3: outputs depend strongly on the hooked activation, so CE differences
    # are far above float32 rounding.
    config = LlamaConfig(vocab_size=64, hidden_size=D_IN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(tiny.model_dir)
    fast.save_pretrained(tiny.model_dir)

    sae = TopKSAE(D_IN, D_SAE, K, seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    save_saelens(sae, tiny.sae_dir, metadata={"hook_name": f"blocks.{LAYER}.hook_{HOOK}", "context_size": CONTEXT})
    return tiny


def reference_reconstruction_metrics(x: Tensor, xhat: Tensor, latents: Tensor) -> dict[str, float]:
    """explained_variance, mse, cossim, l0 of SPEC section 4, written directly in float64."""
    x, xhat = x.double(), xhat.double()
    return {
        "explained_variance": 1 - ((x - xhat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item(),
        "mse": ((x - xhat) ** 2).sum(1).mean().item(),
        "mse_per_element": ((x - xhat) ** 2).mean().item(),
        "cossim": F.cosine_similarity(x, xhat, dim=1).mean().item(),
        "l0": (latents > 0).sum(1).double().mean().item(),
    }


def dense_sae(weights: dict[str, Tensor], k: int) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """x -> (reconstruction, dense latents) from SAELens-layout tensors (W_enc [d_in, d_sae])."""

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
        top = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        return z @ weights["W_dec"] + weights["b_dec"], z

    return run


@contextmanager
def wrapped(module: nn.Module, side: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace `module`'s input ("in") or output ("out") hidden states by fn(them), by wrapping its
    forward (the library uses forward hooks instead, so this is an independent splice)."""
    original = module.forward

    def forward(*args, **kwargs):
        if side == "in":
            if args:
                args = (fn(args[0]), *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            return original(*args, **kwargs)
        out = original(*args, **kwargs)
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # back to the class's forward


def reference_spliced(
    model: nn.Module, module: nn.Module, tokens: Tensor, rows_fn: Callable[[Tensor], Tensor], bos: int
) -> dict[str, float]:
    """CE / KL scores with rows_fn spliced in at `module`'s output, by SAELens's conventions
    written out directly with torch's own loss functions: BOS positions keep their clean activation
    when splicing and are dropped from the means, zero ablation zeroes every position, CE averages
    the predictions at positions 0..T-2 and KL the distributions at positions 0..T-1."""

    def spliced(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        keep = (tokens == bos)[..., None]
        return lambda h: torch.where(keep, h, fn(h.reshape(-1, h.shape[-1])).reshape(h.shape))

    def log_probs(fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        with torch.no_grad():
            if fn is None:
                logits = model(input_ids=tokens).logits
            else:
                with wrapped(module, "out", fn):
                    logits = model(input_ids=tokens).logits
        return F.log_softmax(logits.double(), -1)

    counted = tokens != bos
    clean, recon, zero = log_probs(None), log_probs(spliced(rows_fn)), log_probs(torch.zeros_like)
    ce_rows, targets = counted[:, :-1], tokens[:, 1:][counted[:, :-1]]
    ce_clean, ce_spliced, ce_zero = (F.nll_loss(lp[:, :-1][ce_rows], targets).item() for lp in (clean, recon, zero))
    kl_spliced = F.kl_div(recon[counted], clean[counted], log_target=True, reduction="batchmean").item()
    kl_zero = F.kl_div(zero[counted], clean[counted], log_target=True, reduction="batchmean").item()
    return {
        "ce_loss_without_sae": ce_clean,
        "ce_loss_with_sae": ce_spliced,
        "ce_loss_with_ablation": ce_zero,
        "ce_loss_score": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
        "kl_div_with_sae": kl_spliced,
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": (kl_zero - kl_spliced) / kl_zero,
    }
