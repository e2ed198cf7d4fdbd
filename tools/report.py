"""A self-contained HTML dashboard of a saved SAE: metrics, feature density, top-activating contexts.

    python tools/report.py --sae runs/.../sae --cache ~/.cache/lightning-sae/activations/<hash> --out report.html
    python tools/report.py --sae runs/.../sae --config my_run.yaml --out report.html

The metrics are those `lightning-sae validate` prints, computed the same way (Trainer.validate
of an SAEModule initialised from the SAE, on the cache's held-out rows, spliced CE included),
SAEBench's core set first, by its groups (docs/metrics.md).
Top contexts come from re-running the language model on the held-out token contexts, so every
shown activation is the SAE's own on that exact token (no row-to-token bookkeeping to get wrong).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_html import render  # noqa: E402  (sibling file of this script)

from lightning_sae.data import ActivationDataModule, read_cache  # noqa: E402
from lightning_sae.data.hooks import ActivationRecorder  # noqa: E402
from lightning_sae.evaluation import hook_points  # noqa: E402
from lightning_sae.module import SAEModule  # noqa: E402
from lightning_sae.registry import create_selector  # noqa: E402


@dataclass
class Token:
    text: str
    activation: float


@dataclass
class LatentView:
    index: int
    density: float  # fraction of held-out rows it fired on (from validation)
    max_activation: float
    contexts: list[list[Token]] = field(default_factory=list)


@dataclass
class Report:
    title: str
    metrics: dict[str, float]
    density: list[float]  # per latent, from validation
    latents: list[LatentView]
    info: dict[str, object]
    max_decoder_cosine: list[float] = field(default_factory=list)  # per latent: with its closest other latent


def datamodule_from_cache(cache_dir: str | Path, batch_size: int = 4096, **overrides) -> ActivationDataModule:
    """An ActivationDataModule that opens the finished cache at `cache_dir` with its own settings.

    `batch_size` (not part of a cache's identity) is capped at the cache's training rows, which
    the DataModule insists on; validation reads every held-out row once, in batches of at most
    `batch_size`, as `lightning-sae validate` does.
    """
    rows = max(1, min(batch_size, read_cache(cache_dir).rows["train"]))
    return ActivationDataModule.from_cache(cache_dir, **{"device": "auto", "batch_size": rows, **overrides})


def validate(module: SAEModule, datamodule: L.LightningDataModule, accelerator: str = "auto") -> tuple[dict[str, float], dict[str, Tensor]]:
    """What `lightning-sae validate` computes: (metrics, per-latent statistics of the training
    selection: feature_density, max_decoder_cosine_sim, ...)."""
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in metrics.items()}, module.core_results[module.metric_prefix("sae", "")].latents


@torch.no_grad()
def top_contexts(
    module: SAEModule,
    datamodule: ActivationDataModule,
    density: Tensor,
    num_contexts: int,
    num_latents: int,
    top: int,
    window: tuple[int, int] = (24, 8),
    seed: int = 0,
) -> list[LatentView]:
    """A random sample of the latents that fire on the held-out contexts, each with the `top`
    contexts where it fires most, trimmed to `window` (tokens before, after) its peak."""
    model, tokenizer = datamodule.load_language_model(), datamodule.load_tokenizer()
    layer, hook = None, hook_points(datamodule.metadata)["x"]
    contexts = datamodule.validation_contexts(num_contexts)
    device = next(model.parameters()).device
    sae = module.get_sae("sae")
    indices, values = [], []
    for start in range(0, contexts.shape[0], 8):
        tokens = contexts[start : start + 8]
        with ActivationRecorder(model, layer, [hook], stop=True) as recorder:
            model(input_ids=tokens.to(device), use_cache=False)
        rows = recorder.values[hook].flatten(0, 1).float().to(module.device)
        # Plain TopK: how the SAE is used downstream, where no gradient is at hand.
        _, code, _ = module.encode_decode("sae", rows)
        indices.append(code.indices.view(*tokens.shape, -1).cpu())
        values.append(code.values.view(*tokens.shape, -1).cpu())
    indices, values = torch.cat(indices), torch.cat(values)
    if datamodule.exclude_bos:  # the SAE never trained on BOS rows; their codes are meaningless
        values = values.masked_fill((contexts == tokenizer.bos_token_id)[..., None], 0.0)
    per_context_max = torch.zeros(contexts.shape[0], sae.d_sae).scatter_reduce(
        1, indices.flatten(1), values.flatten(1).clamp_min(0), reduce="amax"
    )
    fired = (per_context_max.amax(0) > 0).nonzero().flatten().tolist()
    sample = sorted(random.Random(seed).sample(fired, min(num_latents, len(fired))))
    views = []
    for latent in sample:
        acts = (values * (indices == latent)).sum(-1)  # [C, T]: this latent on every token
        order = per_context_max[:, latent].argsort(descending=True)[:top]
        view = LatentView(latent, float(density[latent]), float(per_context_max[:, latent].max()))
        for c in order.tolist():
            if per_context_max[c, latent] <= 0:
                break
            peak = int(acts[c].argmax())
            lo, hi = max(0, peak - window[0]), min(contexts.shape[1], peak + window[1] + 1)
            texts = token_texts(tokenizer, contexts[c, lo:hi].tolist())
            view.contexts.append([Token(text, float(a)) for text, a in zip(texts, acts[c, lo:hi])])
        views.append(view)
    return views


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded string, spaces included: the growth of the
    decoded prefix (decoding tokens one by one loses the spacing of many tokenizers)."""
    texts, previous = [], ""
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end])
        # A prefix that stops inside a multi-byte character decodes differently; fall back then.
        texts.append(decoded[len(previous):] if decoded.startswith(previous) else tokenizer.decode(ids[end - 1 : end]))
        previous = decoded
    return texts


def build_report(
    sae_dir: str,
    datamodule: ActivationDataModule,
    selector: str = "topk",
    spliced_eval_contexts: int = 32,
    num_contexts: int = 64,
    num_latents: int = 16,
    top: int = 5,
    accelerator: str = "auto",
    seed: int = 0,
) -> Report:
    if not isinstance(datamodule, ActivationDataModule):
        raise ValueError(
            f"the report needs a language model for its contexts: an ActivationDataModule, not {type(datamodule).__name__}"
        )
    module = SAEModule(init_from=sae_dir, selector=create_selector(selector), spliced_eval_contexts=spliced_eval_contexts)
    metrics, per_latent = validate(module, datamodule, accelerator)
    density = per_latent["feature_density"]
    latents = top_contexts(module, datamodule, density, num_contexts, num_latents, top, seed=seed)
    sae = module.get_sae("sae")
    info = {
        "SAE": sae_dir,
        "shape": f"d_in={sae.d_in}, d_sae={sae.d_sae}, k={sae.k}",
        "selector": selector,
        "top contexts": "plain TopK selection (as used without gradients)"
        + (", BOS positions excluded" if datamodule.exclude_bos else ""),
        **{key: datamodule.metadata.get(key) for key in ("model_name", "hook_name", "context_size", "cache_dir")},
        "spliced CE contexts": spliced_eval_contexts,
    }
    return Report(f"SAE report: {Path(sae_dir).name}", metrics, density.tolist(), latents, info,
                  per_latent["max_decoder_cosine_sim"].tolist())


def datamodule_from_config(config: str) -> L.LightningDataModule:
    """The DataModule of a lightning-sae YAML config (its `data:` section), built by the CLI's parser."""
    from lightning_sae.cli import SAECLI
    from lightning_sae.module import SAETrainingModule
    from lightning_sae.registry import load_all_plugins

    load_all_plugins()
    cli = SAECLI(SAETrainingModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 run=False, args=["--config", config], save_config_callback=None)
    return cli.datamodule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="SAELens or sparsify directory, or a Lightning checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="an activation cache directory (its settings say which model and hook)")
    source.add_argument("--config", help="a lightning-sae YAML config whose data section builds the DataModule")
    parser.add_argument("--out", default="report.html")
    parser.add_argument("--selector", default="topk", help="registered selector of the SAE (default: topk)")
    parser.add_argument("--latents", type=int, default=16, help="latents to show (sampled among those that fire)")
    parser.add_argument("--top", type=int, default=5, help="top-activating contexts per latent")
    parser.add_argument("--contexts", type=int, default=64, help="held-out contexts searched for top activations")
    parser.add_argument("--spliced-contexts", type=int, default=32, help="held-out contexts for spliced CE (0: skip)")
    parser.add_argument("--batch-size", type=int, default=4096, help="validation batch size with --cache (as data.batch_size)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        datamodule = datamodule_from_cache(args.cache, args.batch_size) if args.cache else datamodule_from_config(args.config)
        report = build_report(
            args.sae, datamodule, args.selector, args.spliced_contexts, args.contexts, args.latents, args.top,
            args.accelerator, args.seed,
        )
    except (ValueError, OSError, RuntimeError) as error:  # bad paths, a cache made for other settings, ...
        hint = " (a cache made with gradients needs the SAE's gradient selector: --selector)" if "gradients" in str(error) else ""
        print(f"report: error: {error}{hint}", file=sys.stderr)
        return 2
    Path(args.out).write_text(render(report), encoding="utf-8")
    print(f"wrote {args.out}: {len(report.metrics)} metrics, {len(report.latents)} latents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
