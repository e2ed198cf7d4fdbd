"""A latent browser for a saved SAE: one self-contained HTML page that opens offline.

    python tools/report.py --sae runs/.../sae --cache ~/.cache/lightning-sae/activations/<hash> --out report.html
    python tools/report.py --sae runs/.../sae --config my_run.yaml --out report.html

The page has the metrics `lightning-sae validate` prints, computed the same way (Trainer.validate
of an SAEModule initialised from the SAE, on the held-out rows, spliced CE included), SAEBench's
core set first, by its groups (docs/metrics.md); then, for every latent: its top-activating
contexts and examples from each activation quantile over a sample of the training text
(--sample-tokens, default 2^20, streamed through the model with a progress bar), an activation
histogram, its logit effects through the unembedding, its nearest neighbours by decoder cosine
and its density; a sortable, searchable index of all latents with jump-to, and the dead-latent
list. Examples come from re-running the language model, so every shown activation is the SAE's
own on that exact token; each latent's colours are scaled to the 99th percentile of its
activations, so one outlier does not wash out the rest. Plots are matplotlib PNGs (the `plots`
extra), embedded in the page.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_html import render  # noqa: E402  (sibling files of this script)
from report_stats import (  # noqa: E402
    Example, LatentStats, final_norm_weight, flat_code, logit_effects, nearest_neighbours, quantile_bands,
)

from lightning_sae.progress import progress_bar  # noqa: E402
from lightning_sae.data import ActivationDataModule, read_cache  # noqa: E402
from lightning_sae.data.extract import groups, kept_positions  # noqa: E402
from lightning_sae.data.hooks import ActivationRecorder  # noqa: E402
from lightning_sae.evaluation import hook_points  # noqa: E402
from lightning_sae.module import SAEModule  # noqa: E402
from lightning_sae.registry import create_selector  # noqa: E402


@dataclass
class LatentView:
    """One latent's panel: everything the page shows about it, token ids and all."""

    index: int
    density: float  # fraction of held-out rows it fired on (validation)
    sample_density: float  # fraction of the sample's kept positions it fired on
    max_activation: float
    scale: float  # the colour scale's top: the 99th percentile of its sampled activations
    histogram: list[int]  # counts per log10 bin (report_stats.HIST_*)
    top: list[dict] = field(default_factory=list)  # examples: {"tokens": [...], "acts": {i: a}, "peak": i, "act": a}
    bands: list[dict] = field(default_factory=list)  # {"low", "high", "examples": [...]}
    promoted: list[tuple[int, float]] = field(default_factory=list)  # (token id, logit effect)
    suppressed: list[tuple[int, float]] = field(default_factory=list)
    neighbours: list[tuple[int, float]] = field(default_factory=list)  # (latent, decoder cosine)


@dataclass
class Report:
    title: str
    metrics: dict[str, float]
    density: list[float]  # per latent, from validation
    latents: list[LatentView]
    info: dict[str, object]
    max_decoder_cosine: list[float] = field(default_factory=list)  # per latent: with its closest other latent
    token_text: dict[int, str] = field(default_factory=dict)  # every token id the page shows
    sample: dict[str, int] = field(default_factory=dict)  # contexts, tokens, kept positions, documents started


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
def sample_statistics(
    module: SAEModule,
    datamodule: ActivationDataModule,
    sample_tokens: int,
    top: int,
    reservoir: int,
    batch_contexts: int = 16,
    stride: int = 1,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[LatentStats, Tensor]:
    """One pass over `sample_tokens` tokens of training text (every `stride`-th context after the
    held-out ones): the language model up to the SAE's hook, the SAE's plain TopK code at every
    position the data keeps. Returns the statistics and the sampled contexts [C, T]."""
    model = datamodule.load_language_model()
    hook = hook_points(datamodule.metadata)["x"]
    exclude = datamodule._exclude_token()
    device = next(model.parameters()).device
    sae = module.get_sae("sae")
    size = datamodule.context_size
    wanted = max(1, sample_tokens // size)
    contexts = itertools.islice(datamodule.context_plan(limit_training=False).training(), 0, wanted * stride, stride)
    stats = LatentStats(sae.d_sae, size, top, reservoir, seed)
    sampled = []
    bar = progress_bar(wanted * size, "latent browser sample", "tok", enabled=progress is not False)
    for tokens in groups(contexts, batch_contexts):
        with ActivationRecorder(model, None, [hook], stop=True) as recorder:
            model(input_ids=tokens.to(device), use_cache=False)
        activations = recorder.values[hook]
        kept = kept_positions(tokens, exclude, {"x": activations}).flatten().cpu()
        rows = activations.flatten(0, 1).float().to(module.device)
        # Plain TopK: how the SAE is used downstream, where no gradient is at hand.
        _, code, _ = module.encode_decode("sae", rows)
        token, latent, value = (t.cpu() for t in flat_code(code.indices, code.values, code.offsets, rows.shape[0]))
        stats.add(len(sampled) * size, tokens.numel(), token, latent.long(), value, kept)
        sampled.extend(tokens)
        bar.update(tokens.numel())
    bar.total = len(sampled) * size  # the text may end before the requested sample: that is the whole of it
    bar.close()
    stats.finish()
    if not sampled:
        raise ValueError("the text has no training context to sample: use a larger dataset or a smaller --stride")
    return stats, torch.stack(sampled)


def token_text_map(tokenizer, ids: set[int]) -> dict[int, str]:
    """Each token's text as it appears inside decoded text, leading space included: decoded after
    a fixed ordinary token and cut at that token's own text (decoding a token alone drops the
    leading space of SentencePiece tokenizers)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    prefix = tokenizer.decode(anchor) if anchor else ""
    out = {}
    for token in sorted(ids):
        joined = tokenizer.decode(anchor + [token]) if anchor else ""
        text = joined[len(prefix):] if anchor and joined.startswith(prefix) else tokenizer.decode([token])
        out[token] = text or f"<{token}>"  # an id the tokenizer has no text for
    return out


def _window(stats: LatentStats, contexts: Tensor, latent: int, example: Example, window: tuple[int, int]) -> dict:
    size = contexts.shape[1]
    lo, hi = max(0, example.position - window[0]), min(size, example.position + window[1] + 1)
    first = example.context * size
    acts = stats.activations_in(latent, first + lo, first + hi - 1)
    return {
        "tokens": contexts[example.context, lo:hi].tolist(),
        "acts": {position - first - lo: round(value, 4) for position, value in acts.items()},
        "peak": example.position - lo,
        "act": round(example.activation, 4),
        "context": example.context,  # in the sample
        "position": example.position,
    }


def latent_views(
    module: SAEModule,
    datamodule: ActivationDataModule,
    stats: LatentStats,
    contexts: Tensor,
    density: Tensor,
    bands: int,
    per_band: int,
    effects: int,
    neighbours: int,
    window: tuple[int, int],
) -> list[LatentView]:
    """Every latent's view: examples from the sample, logit effects and neighbours from the weights."""
    sae = module.get_sae("sae")
    w_dec = sae.W_dec.detach().cpu()
    model = datamodule.load_language_model()
    unembedding = model.get_output_embeddings().weight.detach().cpu()
    high, high_ids, low, low_ids = logit_effects(w_dec, unembedding, _cpu(final_norm_weight(model)), effects)
    cosines, close = nearest_neighbours(w_dec, neighbours)
    views = []
    bar = progress_bar(sae.d_sae, "latent browser views", "latent")
    for latent in range(sae.d_sae):
        firings = stats.sampled_firings(latent)
        view = LatentView(
            latent, float(density[latent]), float(stats.fired[latent]) / max(1, stats.positions_seen),
            max(0.0, float(stats.top_values[latent, 0])), stats.robust_scale(latent), stats.histogram[latent].tolist(),
            top=[_window(stats, contexts, latent, e, window) for e in stats.top_examples(latent)],
            bands=[{"low": round(lo_, 4), "high": round(hi_, 4), "examples": [_window(stats, contexts, latent, e, window) for e in members]}
                   for lo_, hi_, members in quantile_bands(firings, bands, per_band)],
            promoted=list(zip(high_ids[latent].tolist(), [round(v, 4) for v in high[latent].tolist()])),
            suppressed=list(zip(low_ids[latent].tolist(), [round(v, 4) for v in low[latent].tolist()])),
            neighbours=list(zip(close[latent].tolist(), [round(v, 4) for v in cosines[latent].tolist()])),
        )
        views.append(view)
        bar.update(1)
    bar.close()
    return views


def _cpu(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.cpu()


def build_report(
    sae_dir: str,
    datamodule: ActivationDataModule,
    selector: str = "topk",
    spliced_eval_contexts: int = 32,
    sample_tokens: int = 1 << 20,
    top: int = 10,
    bands: int = 4,
    per_band: int = 3,
    reservoir: int = 256,
    effects: int = 10,
    neighbours: int = 5,
    stride: int = 1,
    accelerator: str = "auto",
    seed: int = 0,
    progress: bool | None = None,
) -> Report:
    if not isinstance(datamodule, ActivationDataModule):
        raise ValueError(
            f"the report needs a language model for its contexts: an ActivationDataModule, not {type(datamodule).__name__}"
        )
    module = SAEModule(init_from=sae_dir, selector=create_selector(selector), spliced_eval_contexts=spliced_eval_contexts)
    metrics, per_latent = validate(module, datamodule, accelerator)
    density = per_latent["feature_density"]
    stats, contexts = sample_statistics(module, datamodule, sample_tokens, top, reservoir, stride=stride, seed=seed,
                                        progress=progress)
    latents = latent_views(module, datamodule, stats, contexts, density, bands, per_band, effects, neighbours, (24, 8))
    tokenizer = datamodule.load_tokenizer()
    shown = {t for view in latents for ex in [*view.top, *(e for b in view.bands for e in b["examples"])] for t in ex["tokens"]}
    shown |= {t for view in latents for t, _ in [*view.promoted, *view.suppressed]}
    sae = module.get_sae("sae")
    bos = tokenizer.bos_token_id
    sample = {
        "contexts": contexts.shape[0], "tokens": contexts.numel(), "kept positions": stats.positions_seen,
        "documents started": int((contexts[:, 1:] == bos).sum()) if bos is not None else -1,
    }
    exclusion = datamodule._exclusion_settings() if hasattr(datamodule, "_exclusion_settings") else {}
    info = {
        "SAE": sae_dir,
        "shape": f"d_in={sae.d_in}, d_sae={sae.d_sae}, k={sae.k}",
        "selector": selector,
        "examples": "plain TopK selection (as used without gradients) over the sample; "
        + ("BOS positions excluded" if datamodule.exclude_bos else "BOS positions included")
        + (f"; also excluded: {exclusion}" if exclusion else ""),
        **{key: datamodule.metadata.get(key) for key in ("model_name", "hook_name", "context_size", "cache_dir")},
        "spliced CE contexts": spliced_eval_contexts,
        "sample": f"{sample['tokens']:,} tokens in {sample['contexts']:,} training contexts (every {stride}), "
        f"{sample['kept positions']:,} positions kept, {sample['documents started']:,} documents starting inside them",
    }
    return Report(f"SAE report: {Path(sae_dir).name}", metrics, density.tolist(), latents, info,
                  per_latent["max_decoder_cosine_sim"].tolist(), token_text_map(tokenizer, shown), sample)


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
    parser.add_argument("--sample-tokens", type=int, default=1 << 20,
                        help="training-text tokens streamed for the examples and histograms (default: 1048576)")
    parser.add_argument("--stride", type=int, default=1, help="take every STRIDE-th training context, to spread the sample")
    parser.add_argument("--top", type=int, default=10, help="top-activating examples per latent")
    parser.add_argument("--bands", type=int, default=4, help="activation quantile bands per latent")
    parser.add_argument("--per-band", type=int, default=3, help="examples per quantile band")
    parser.add_argument("--effects", type=int, default=10, help="promoted and suppressed tokens per latent")
    parser.add_argument("--neighbours", type=int, default=5, help="nearest latents by decoder cosine")
    parser.add_argument("--spliced-contexts", type=int, default=32, help="held-out contexts for spliced CE (0: skip)")
    parser.add_argument("--batch-size", type=int, default=4096, help="validation batch size with --cache (as data.batch_size)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        datamodule = datamodule_from_cache(args.cache, args.batch_size) if args.cache else datamodule_from_config(args.config)
        report = build_report(
            args.sae, datamodule, args.selector, args.spliced_contexts, args.sample_tokens, args.top, args.bands,
            args.per_band, effects=args.effects, neighbours=args.neighbours, stride=args.stride,
            accelerator=args.accelerator, seed=args.seed,
        )
    except (ValueError, OSError, RuntimeError) as error:  # bad paths, a cache made for other settings, ...
        hint = " (a cache made with gradients needs the SAE's gradient selector: --selector)" if "gradients" in str(error) else ""
        print(f"report: error: {error}{hint}", file=sys.stderr)
        return 2
    Path(args.out).write_text(render(report), encoding="utf-8")
    dead = sum(1 for view in report.latents if view.sample_density == 0)
    print(f"wrote {args.out}: {len(report.metrics)} metrics, {len(report.latents)} latents ({dead} never fired in the sample)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
