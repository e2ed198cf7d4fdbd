"""The studies' shared activation cache: one model pass writes every tensor both studies read.

One cache holds, for every kept token of the text, the residual stream after the g-SAE layers
(`layers.<L>/x`) with its dL/dx (`layers.<L>/grad`, one backward pass serves every layer) and
the JSAE layer's MLP input and output (`layers.<J>/mlp_in`, `layers.<J>/mlp_out`, read during the
same forward). It is an ordinary `lightning_sae.data` cache (manifest, shards, hashes; resumable
from its last complete shard), built by `ActivationDataModule` with a fixed routing instead of a
training module's request. `StudyData` then serves one study's slice of it under the batch keys
that study's module asks for ("x"/"grad" for an SAE, "x"/"y" for a JSAE pair), with the metadata
(hook points) the spliced evaluation and JSAE's frozen MLP need.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_sae.data import ActivationDataModule, cache, hooks
from lightning_sae.data.datamodule import Routing
from lightning_sae.data_request import DataRequest


@dataclass(frozen=True)
class CacheSpec:
    """What the shared cache holds: the text, the model, and the layers of each study."""

    model: str = "smollm2-135m"
    dataset: str = "python-docs"
    gsae_layers: tuple[int, ...] = (19, 15)
    jsae_layer: int = 15
    num_tokens: int = 640_000
    validation_fraction: float = 0.05
    context_size: int = 128
    cache_dtype: str = "bfloat16"  # keeps the gradient's dynamic range (float16 would flush small values)
    model_batch_size: int = 8
    shard_tokens: int = 16_384  # a killed build loses at most one shard (~15 min of this CPU)
    model_dtype: str = "auto"
    streaming: bool = False  # a hub dataset read as a stream instead of downloaded whole

    def roles(self) -> dict[str, str]:
        roles = {f"layers.{layer}/x": f"layers.{layer}" for layer in self.gsae_layers}
        if self.jsae_layer is not None and self.jsae_layer >= 0:
            roles[f"layers.{self.jsae_layer}/mlp_in"] = f"layers.{self.jsae_layer}.mlp_in"
            roles[f"layers.{self.jsae_layer}/mlp_out"] = f"layers.{self.jsae_layer}.mlp_out"
        return roles

    def gradients(self) -> dict[str, str]:
        return {f"layers.{layer}/grad": f"layers.{layer}/x" for layer in self.gsae_layers}

    def data_kwargs(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "num_tokens": self.num_tokens,
                    "validation_fraction": self.validation_fraction, "context_size": self.context_size,
                    "cache_dtype": self.cache_dtype, "model_batch_size": self.model_batch_size,
                    "shard_tokens": self.shard_tokens, "model_dtype": self.model_dtype,
                "streaming": self.streaming}


class StudyData(ActivationDataModule):
    """The shared cache (built on first use, resumed if unfinished), serving the cache keys of
    `select` ({batch key: cache key}) under their batch keys. `hookpoints` are the hook point
    names of those batch keys (for the spliced evaluation and JSAE's MLP)."""

    def __init__(self, spec: CacheSpec, cache_dir: str, select: dict[str, str] | None = None, partial: bool = False, **kwargs):
        super().__init__(**{**spec.data_kwargs(), "cache_dir": cache_dir, "device": "cpu", **kwargs})
        self.spec, self.select, self.partial = spec, dict(select or {}), partial
        # Checkpoints keep the DataModule's hyperparameters and are read with weights_only=True:
        # plain values only, not the dataclass.
        for stored in (self._hparams, self._hparams_initial):
            stored["spec"] = asdict(spec)
        self.pool_rows = 0  # training rows served (all of a finished cache, or the shards written so far)

    def routing(self, request: DataRequest | None = None) -> Routing:
        # The cache's identity: every key both studies read, whatever the training module asks.
        roles = {key: hooks.canonical_hookpoint(self.model_skeleton(), name) for key, name in self.spec.roles().items()}
        return Routing(sorted({key.split("/")[0] for key in roles}), roles, self.spec.gradients())

    def build(self) -> Path:
        """Builds (or finishes) the cache; returns its directory."""
        return self._build_cache(self.routing(), 0, 1)

    def setup(self, stage: str | None = None) -> None:
        full = self._routing = self.routing()
        settings = self._settings(full)
        self._know_data(settings)
        path = self._cache_path(settings)
        if self.partial:
            manifest = self._open_partial(path, settings)
        else:
            self._build_cache(full, 0, 1)
            manifest = self._open_verified(path, settings)
        keys = list(self.select.values())
        self._readers = {split: _Renamed(cache.ShardReader(path, manifest, split, keys), self.select) for split in ("train", "val")}
        self.widths = {key: manifest["widths"][self.select[key]] for key in self.select if key != "grad"}
        self.pool_rows = self._readers["train"].num_rows
        self._cache_location = str(path)
        roles = {key: full.roles[self.select[key]] for key in self.widths}
        site = roles["x"] if "y" not in roles else roles["x"].rsplit(".", 1)[0]
        self.sites = [site]
        self._set_metadata(Routing([site], roles, {"grad": "x"} if "grad" in self.select else {}))

    def _open_partial(self, path: Path, settings: dict) -> dict:
        """The shards written so far of a cache another process may still be writing: its
        validation split must be complete and at least one training shard written. Serving
        only listed shards is safe: a shard is listed only once it is complete."""
        manifest = cache.read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no activation cache at {path} yet: build it first (study_data.py)")
        cache.check_settings(manifest, settings, path)
        val, _ = cache.context_counts(self.num_tokens, self.context_size, self.validation_fraction)
        held_out = sum(shard["contexts"] for shard in manifest["shards"] if shard["split"] == "val")
        if held_out < val or not any(shard["split"] == "train" for shard in manifest["shards"]):
            raise FileNotFoundError(f"the cache at {path} has no training shard yet")
        problems = cache.check_shards(path, manifest, "header", self._vocab_size())
        if problems:
            raise cache.DamagedCacheError(path, manifest, problems)
        return manifest

    def manifest(self) -> dict | None:
        return cache.read_manifest(self._cache_path(self._settings(self.routing())))


class _Renamed:
    """A ShardReader whose rows come back under the study's batch keys."""

    def __init__(self, reader: cache.ShardReader, select: dict[str, str]):
        self.reader, self.select = reader, select
        self.num_rows = reader.num_rows

    def __call__(self, rows: Tensor) -> dict[str, Tensor]:
        out = self.reader(rows)
        return {key: out[source] for key, source in self.select.items()}

    def contexts(self, limit: int) -> Tensor:
        return self.reader.contexts(limit)


def spec_arguments(parser: argparse.ArgumentParser, defaults: CacheSpec = CacheSpec()) -> None:
    group = parser.add_argument_group("the shared activation cache")
    group.add_argument("--model", default=defaults.model, help="embedded smollm2-135m, a hub name or a local folder")
    group.add_argument("--dataset", default=defaults.dataset, help="python-docs (embedded), a hub dataset or local text files")
    group.add_argument("--gsae-layers", type=int, nargs="+", default=list(defaults.gsae_layers))
    group.add_argument("--jsae-layer", type=int, default=defaults.jsae_layer, help="-1: no JSAE tensors")
    group.add_argument("--num-tokens", type=int, default=defaults.num_tokens, help="tokens cached (the text may end first)")
    group.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    group.add_argument("--context-size", type=int, default=defaults.context_size)
    group.add_argument("--cache-dtype", default=defaults.cache_dtype)
    group.add_argument("--model-batch-size", type=int, default=defaults.model_batch_size)
    group.add_argument("--model-dtype", default=defaults.model_dtype,
                       help="the model's dtype while caching (auto: bfloat16 where the CPU or GPU has fast bf16)")


def spec_from(args: argparse.Namespace) -> CacheSpec:
    return CacheSpec(model=args.model, dataset=args.dataset, gsae_layers=tuple(args.gsae_layers), jsae_layer=args.jsae_layer,
                     num_tokens=args.num_tokens, validation_fraction=args.validation_fraction, context_size=args.context_size,
                     cache_dtype=args.cache_dtype, model_batch_size=args.model_batch_size, model_dtype=args.model_dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or resume) the studies' shared activation cache.")
    spec_arguments(parser)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = StudyData(spec_from(args), args.cache_dir)
    path = data.build()
    manifest = cache.read_manifest(path)
    print(f"cache {path}: {manifest['tokens']:,} tokens, rows {manifest['rows']}, keys {sorted(manifest['widths'])}")


if __name__ == "__main__":
    main()
