"""ActivationDataModule: language-model activations at one or many hook points, read from an
on-disk cache or streamed from the model during the fit, served as shuffled batches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lightning_sae.batching import LoaderPosition, ResumableLoader, ShuffledBatches
from lightning_sae.data import cache, hooks, models, text
from lightning_sae.data.extract import ContextPlan, Exclusion, Extractor, extract_rows, groups, rows_from
from lightning_sae.data.stream import StreamedBatches, StreamedValidation
from lightning_sae.data_request import DataRequest, Hook, request_of
from lightning_sae.errors import ConfigError
from lightning_sae.version import __version__

SOURCES = ("cache", "stream")


@dataclass(frozen=True)
class Routing:
    """Where every batch key comes from. One site per hook point the user chose; with several,
    batch keys carry the site as a prefix ("layers.9/x"), with one they are the bare roles."""

    sites: list[str]
    roles: dict[str, str]  # batch key -> hook point name
    gradients: dict[str, str]  # gradient batch key -> the batch key whose gradient it is


class ActivationDataModule(L.LightningDataModule):
    """Activations (and dL/dx when asked) of a language model for the training module's
    `data_request()`, at one hook point or many, served as shuffled float32 batches
    {role: [B, D], ..., "grad": [B, D]} (with several hook points: {"<site>/<role>": ...}).

    Two sources share one data path (lightning_sae.data.extract):
    - source "cache": one model pass writes the activations to disk, every rank writing its own
      part in parallel; later fits (any world size) read the cache. A cache is identified by its
      settings: with `cache_dir` unset it lives under the user cache directory in a folder named
      by a hash of them; a `cache_dir` holding a cache made with other settings is an error
      naming the differing fields, never silently reused.
    - source "stream": the model runs inside the fit on each rank's own device, on the rank's
      own share of the text, into a shuffle buffer of `buffer_tokens` rows; nothing is written
      but checkpoints and logs. An epoch is `num_tokens` tokens (validation included); the next
      epoch continues the text, which starts again when it ends.

    Hook points: `layer` (one or a list) with `hook`, or an explicit `hookpoints` list. A hook is
    one of resid_pre, resid_post, mlp_in, mlp_out, or a module path inside a decoder layer
    (self_attn.o_proj, mlp.act_fn; ":input" for the module's input). `hookpoints` take full
    names: layers.9 (resid_post), layers.9.mlp_in, layers.9.self_attn.o_proj:input,
    model.norm, or globs such as layers.*.mlp (lightning_sae.data.hooks explains the names).
    Each hook point is a site: the training module trains its SAE (or SAEs) on each.

    Args:
        model: "smollm2-135m" (the embedded SmolLM2-135M GGUF, no download), a hub name or a local folder.
        model_dtype: float32, float16 or bfloat16 for the model's weights and activations, or
            "auto" (default): bfloat16 where bf16 matmuls are fast on the model's device (AMX /
            AVX512-BF16 CPUs, CUDA with bf16), else float32. The measurement behind the default
            (docs/performance.md, "The model pass in bf16"): bf16 made the model pass 2.4-3x
            faster on such a CPU and moved a trained SAE's validation metrics by no more than a
            change of seed does. `self.model_dtype` and the cache's settings hold the concrete dtype, so a
            cache made in bfloat16 is never read as a float32 one.
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]" for caching; a stream runs
            the model on each rank's own training device.
        trust_remote_code: allow a hub model's own code to run (off unless asked).
        revision: hub revision (branch, tag or commit) of the model.
        layer: decoder layer (or list of layers) whose `hook` is read.
        hook: hook kind or layer-relative module path; also the default of roles the request leaves open.
        hookpoints: full hook point names or globs; when given, `layer` and `hook` are not used for sites.
        source: "cache" (write once to disk, then read) or "stream" (run the model during the fit).
        buffer_tokens: rows of the stream's shuffle buffer per rank (at least one batch; rounded
            down to whole batches).
        dataset: "python-docs" (English shipped with Python, no download), a `datasets` hub name, a
            local folder, or local text/json/jsonl/parquet/csv files as a path or glob.
        dataset_config: the `datasets` configuration name, if any.
        split: dataset split to read.
        text_column: the column holding the text.
        streaming: stream the dataset instead of downloading and preparing it whole.
        txt_documents: how local .txt files become documents: "file" (each file one document,
            newlines kept), "paragraphs" (split on blank lines) or "lines" (one per line). BOS
            goes only where a document starts.
        loader_options: extra keyword arguments for `datasets.load_dataset` (hub and local files).
        context_size: tokens per context (BOS included).
        prepend_bos: start every context with the BOS token.
        exclude_bos: leave positions holding BOS out of the rows (contexts are packed, so there
            is no padding to exclude).
        exclude_tokens: token ids whose positions are left out of the rows and of the spliced-in
            evaluation (sparsify's `exclude_tokens`; e.g. a chat template's special tokens).
        exclude_positions: positions in each context (0 is the first; negative counts from the
            end) left out the same way, e.g. [1] for the attention-sink position after BOS.
        exclude_norm_above: leave out positions whose SAE input ("x") has a norm above this
            multiple of the (lower) median norm over its context's positions kept by the other
            rules (massive activations). All three are part of the cache's identity and of the saved SAE's cfg.
        num_tokens: tokens to run through the model (contexts x context_size), validation included;
            for a stream, per epoch.
        validation_fraction: share of those contexts held out for validation (taken first).
        cache_dir: where the cache lives; None: <user cache>/lightning-sae/activations/<settings hash>.
        cache_dtype: float32, float16 or bfloat16 on disk (batches are always float32).
        shard_tokens: tokens per shard file (a resumed run restarts at the last complete shard).
        model_batch_size: contexts per forward pass.
        batch_size: rows (tokens) per training batch, per rank.
        num_workers: DataLoader worker processes (cache only: a stream runs in the training process).
        seed: shuffling seed.
        verify: how a cache's shards are checked, in each process, before their rows are served:
            "background" (default): when the cache is opened, each file's npy header against the
            manifest, its exact length and every token id within the model's vocabulary; then
            every byte against the content hash recorded when the shard was written, in a
            background thread (validation shards first), a batch waiting only for shards not yet
            verified. So a flipped bit, or a shard copied in from another cache, stops the fit
            with one line before any step trains on it. "full": the same hashing, all of it
            before the first batch. "header": the open-time checks only (a changed byte goes
            unnoticed; NaN/inf in a validation row stops the fit naming its shard and row, in a
            training row NonFiniteGuard stops it after that step). "off": nothing. Cost
            (tools/bench_verify.py; docs/performance.md, "Verifying the activation cache").
        rebuild_damaged: when verification finds damaged shards, recompute only those (from
            their writer's and index's contexts in the text) instead of stopping.
        overlap_model_pass: a stream fills its next buffer in a background thread while the
            training steps use the current one (the same rows in the same order either way);
            docs/performance.md ("End to end") has the measurement behind the default.
    """

    def __init__(
        self,
        model: str = models.EMBEDDED_MODEL,
        model_dtype: str = models.AUTO_DTYPE,
        device: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        layer: int | list[int] = 15,
        hook: str = "resid_post",
        hookpoints: list[str] | None = None,
        source: str = "cache",
        buffer_tokens: int = 65_536,
        dataset: str = text.EMBEDDED_CORPUS,
        dataset_config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        txt_documents: str = "file",
        loader_options: dict | None = None,
        context_size: int = 128,
        prepend_bos: bool = True,
        exclude_bos: bool = True,
        exclude_tokens: list[int] | None = None,
        exclude_positions: list[int] | None = None,
        exclude_norm_above: float | None = None,
        num_tokens: int = 200_000,
        validation_fraction: float = 0.05,
        cache_dir: str | None = None,
        cache_dtype: str = "float32",
        shard_tokens: int = 65_536,
        model_batch_size: int = 16,
        batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        verify: str = cache.DEFAULT_VERIFY,
        rebuild_damaged: bool = False,
        overlap_model_pass: bool = False,
    ):
        super().__init__()
        layers = [layer] if isinstance(layer, int) else list(layer)
        if not layers or not all(isinstance(n, int) for n in layers):
            raise ConfigError(f"layer must be an integer or a non-empty list of integers, got {layer!r}")
        if hookpoints is not None and not hookpoints:
            raise ConfigError("hookpoints is an empty list: give at least one hook point name, or leave it unset")
        if source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")
        if verify not in cache.VERIFY_MODES:
            raise ConfigError(f"verify must be one of {list(cache.VERIFY_MODES)}, got {verify!r}")
        if txt_documents not in text.TXT_DOCUMENTS:
            raise ConfigError(f"txt_documents must be one of {list(text.TXT_DOCUMENTS)}, got {txt_documents!r}")
        if model_dtype != models.AUTO_DTYPE:
            models.torch_dtype(model_dtype)
        models.torch_dtype(cache_dtype)
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if num_tokens < context_size:
            raise ValueError(f"num_tokens ({num_tokens}) must be at least one context ({context_size})")
        if batch_size < 1 or model_batch_size < 1:
            raise ValueError(f"batch_size and model_batch_size must be >= 1, got {batch_size}, {model_batch_size}")
        if source == "stream":
            if buffer_tokens < batch_size:
                raise ConfigError(f"buffer_tokens ({buffer_tokens}) is smaller than one batch ({batch_size}): "
                                  "the shuffle buffer must hold at least one batch; raise buffer_tokens")
            if num_workers:
                raise ConfigError("a stream runs the model in the training process: num_workers must be 0")
        if exclude_norm_above is not None and not exclude_norm_above > 0:
            raise ConfigError(f"exclude_norm_above must be a positive multiple of the median norm, got {exclude_norm_above!r}")
        self.save_hyperparameters()
        self.exclude_tokens = sorted(set(exclude_tokens or []))
        self.exclude_positions = sorted(set(exclude_positions or []))
        self.exclude_norm_above = exclude_norm_above
        self.model, self.requested_model_dtype, self.device = model, model_dtype, device
        self.trust_remote_code, self.revision = trust_remote_code, revision
        self.layers, self.hook, self.hookpoints = layers, hook, hookpoints
        self.layer = layers[0] if len(layers) == 1 else layers
        self.source, self.buffer_tokens = source, buffer_tokens
        self.dataset, self.dataset_config, self.split = dataset, dataset_config, split
        self.text_column, self.streaming = text_column, streaming
        self.txt_documents, self.loader_options = txt_documents, loader_options
        self.context_size, self.prepend_bos, self.exclude_bos = context_size, prepend_bos, exclude_bos
        self.num_tokens, self.validation_fraction = num_tokens, validation_fraction
        self.cache_dir, self.cache_dtype, self.shard_tokens = cache_dir, cache_dtype, shard_tokens
        self.model_batch_size, self.batch_size = model_batch_size, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.verify, self.rebuild_damaged = verify, rebuild_damaged
        self.overlap_model_pass = overlap_model_pass
        self.widths: dict[str, int] = {}
        self.sites: list[str] = []
        self.metadata: dict = {}
        self._model: PreTrainedModel | None = None
        self._skeleton: nn.Module | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._readers: dict[str, cache.ShardReader] = {}
        self._routing: Routing | None = None
        self._cache_location: str | None = None
        self._plans: dict[bool, ContextPlan] = {}
        self._train_position = LoaderPosition()  # the training loader's place, through checkpoints
        self._data_identity: str | None = None  # which data this module serves (set in setup)
        self._resumed_identity: str | None = None  # which data a restored checkpoint was trained on

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike, **overrides) -> "ActivationDataModule":
        """A DataModule that reads the finished cache at `cache_dir` with the settings it was made
        with (`overrides` for what is not part of its identity: batch_size, device, ...)."""
        manifest = cache.read_manifest(Path(cache_dir))
        if manifest is None:
            raise FileNotFoundError(f"{cache_dir} holds no activation cache (no manifest.json)")
        if not manifest["complete"]:
            raise ValueError(f"{cache_dir} holds an unfinished cache; finish it with a fit (or prepare_data) first")
        settings = manifest["settings"]
        missing = [key for key in ("model_name", "sites", "dataset_path") if key not in manifest]
        missing += [f"settings.{key}" for key in ("model", "dataset", "split", "text_column", "streaming", "txt_documents",
                                                  "loader_options", "prepend_bos", "exclude_bos", "model_dtype")
                    if key not in settings]
        if missing:
            raise cache.ManifestError(f"the manifest of {cache_dir} lacks {missing}, which from_cache needs to "
                                      "recreate its settings; give the DataModule its settings instead")
        kwargs = dict(
            model=manifest["model_name"], revision=settings["model"].get("revision"), model_dtype=settings["model_dtype"],
            hookpoints=manifest["sites"], dataset=manifest["dataset_path"], dataset_config=settings["dataset"].get("config"),
            split=settings["split"], text_column=settings["text_column"], streaming=settings["streaming"],
            txt_documents=settings["txt_documents"], loader_options=settings["loader_options"],
            context_size=settings["context_size"], prepend_bos=settings["prepend_bos"], exclude_bos=settings["exclude_bos"],
            **{f"exclude_{key}": value for key, value in settings.get("exclusion", {}).items()},
            num_tokens=settings["num_tokens"], validation_fraction=settings["validation_fraction"], cache_dir=str(cache_dir),
            cache_dtype=settings["cache_dtype"], shard_tokens=settings["shard_tokens"],
            batch_size=max(1, min(4096, manifest["rows"]["train"])),
        )
        return cls(**{**kwargs, **overrides})

    def state_dict(self) -> dict:
        state: dict = self._train_position.state_dict()
        if self._data_identity is not None:
            state["data_identity"] = self._data_identity
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self._resumed_identity = state.pop("data_identity", None)  # checkpoints before it have none
        self._check_resumed_data()
        self._train_position.load_state_dict(state)

    def _know_data(self, settings: dict) -> None:
        """Remember which data this module serves (a digest of what decides it), so that its
        checkpoints record it and resuming one on other data is refused."""
        # Content, not paths: a moved model folder or text is the same data.
        model, dataset = settings["model"], settings["dataset"]
        identity = {**settings, "model": {"fingerprint": model["fingerprint"]} if "fingerprint" in model else model,
                    "dataset": {key: value for key, value in dataset.items() if key != "files"}}
        self._data_identity = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._check_resumed_data()

    def _check_resumed_data(self) -> None:
        # Lightning restores a checkpoint after setup with most strategies, before it with some: both orders
        # check. Only a fit resumes: validating a checkpoint on other data is what `validate` is for.
        if None in (self._resumed_identity, self._data_identity) or self._resumed_identity == self._data_identity:
            return
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        raise ConfigError(
            f"the checkpoint being resumed was trained on other data than this DataModule serves (data identity "
            f"{self._resumed_identity}, here {self._data_identity}: another model, model_dtype, text, layer, num_tokens or "
            "cache_dtype). Resuming would carry its optimizer and its place in the data over to other data: "
            "resume it with the data settings it was trained with, or start a new run."
        )

    @property
    def model_dtype(self) -> str:
        """The dtype the language model runs in: `model_dtype` as given, with "auto" resolved
        for the device the model sits on (caching: `device`; a stream: the rank's device)."""
        return models.resolve_model_dtype(self.requested_model_dtype, self._model_device())

    # ---- which tensors, from where ---------------------------------------------------------------
    def _request(self) -> DataRequest:
        return request_of(self.trainer)

    def model_skeleton(self) -> nn.Module:
        """The model's modules without its weights (meta device): hook points are resolved and
        checked on it before any model pass, so a wrong name fails in seconds."""
        if self._skeleton is None:
            models.model_identity(self.model, self.revision, self.trust_remote_code)  # clear errors for bad names
            config = AutoConfig.from_pretrained(
                models.model_location(self.model), revision=self.revision, trust_remote_code=self.trust_remote_code
            )
            with torch.device("meta"):
                self._skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        return self._skeleton

    def routing(self, request: DataRequest | None = None) -> Routing:
        """Sites and batch keys for the request (the training module's unless given)."""
        request = request or self._request()
        if "x" not in request.reads:
            raise ValueError(f"a DataRequest needs a batch key 'x'; got {sorted(request.reads)}")
        skeleton = self.model_skeleton()
        self._check_context_size(skeleton)
        if self.hookpoints is not None:
            patterns = list(self.hookpoints)
        else:
            for layer in self.layers:
                hooks.check_layer(skeleton, layer)
            patterns = [f"layers.{layer}.{self.hook}" for layer in self.layers]
        sites = hooks.expand_hookpoints(skeleton, patterns)
        roles: dict[str, str] = {}
        gradients: dict[str, str] = {}
        for site in sites:
            prefix = f"{site}/" if len(sites) > 1 else ""
            for key, hook in request.reads.items():
                roles[prefix + key] = self._hookpoint_of(skeleton, site, key, hook)
            if request.gradients:
                gradients[prefix + "grad"] = prefix + "x"
        if request.check_model is not None:
            request.check_model(skeleton, roles)
        return Routing(sites, roles, gradients)

    def _check_context_size(self, skeleton: nn.Module) -> None:
        """A context longer than the model's positions is an IndexError deep in a position
        embedding (GPT-2, OPT) or activations from positions it never trained on (rotary)."""
        positions = getattr(skeleton.config, "max_position_embeddings", None)
        if isinstance(positions, int) and self.context_size > positions:
            raise ConfigError(f"context_size {self.context_size} is more than the {positions} positions {self.model} takes "
                              f"(its config's max_position_embeddings): set data.context_size to {positions} or less")

    @staticmethod
    def _hookpoint_of(skeleton: nn.Module, site: str, key: str, hook: Hook) -> str:
        """The hook point name batch key `key` is read at: the site itself, a kind of the site's
        layer (e.g. a transcoder's mlp_in and mlp_out), or an explicit hook point."""
        if hook.is_site:
            return site
        if hook.layer_kind is not None:
            layer = hooks.hookpoint_layer(site)
            if layer is None:
                raise ConfigError(f"batch key '{key}' reads '{hook.layer_kind}' of the site's layer, but hook point '{site}' "
                                  "lies in no decoder layer: choose hook points inside layers (layers.N...)")
            name = hooks.canonical_hookpoint(skeleton, f"layers.{layer}.{hook.layer_kind.value}")
        else:
            name = hooks.canonical_hookpoint(skeleton, hook.hookpoint)
        hooks.resolve_hookpoint(skeleton, name)
        return name

    def _dataset_identity(self) -> dict:
        if self.dataset == text.EMBEDDED_CORPUS:
            return {"name": text.python_docs_identity()}
        files = text.local_files(self.dataset)
        if files:
            return {"files": [os.path.abspath(f) for f in files], "fingerprint": models.fingerprint([Path(f) for f in files])}
        return {"name": self.dataset, "config": self.dataset_config}

    def _settings(self, routing: Routing) -> dict:
        """Everything that decides the cache's contents (not model_batch_size, device or the
        number of ranks that write it, which change results only by floating-point rounding)."""
        return {
            "model": models.model_identity(self.model, self.revision, self.trust_remote_code),
            "model_dtype": self.model_dtype,
            "roles": routing.roles,
            "gradients": routing.gradients,
            "dataset": self._dataset_identity(),
            "split": self.split,
            "text_column": self.text_column,
            "streaming": self.streaming,
            "txt_documents": self.txt_documents,
            "loader_options": self.loader_options,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "exclude_bos": self.exclude_bos,
            "num_tokens": self.num_tokens,
            "validation_fraction": self.validation_fraction,
            "cache_dtype": self.cache_dtype,
            "shard_tokens": self.shard_tokens,
            **({"exclusion": exclusion} if (exclusion := self._exclusion_settings()) else {}),
        }

    def _exclusion_settings(self) -> dict:
        """The exclusions beyond BOS, as the cache's settings and the saved cfg record them
        (empty, and so absent from the settings, when there are none: older caches stay valid)."""
        found = {"tokens": self.exclude_tokens, "positions": self.exclude_positions, "norm_above": self.exclude_norm_above}
        return {key: value for key, value in found.items() if value not in (None, [])}

    def _cache_path(self, settings: dict) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return models.user_cache_dir() / "activations" / digest

    def _context_counts(self) -> tuple[int, int]:
        """(validation contexts, training contexts) that num_tokens and validation_fraction give."""
        val, train = cache.context_counts(self.num_tokens, self.context_size, self.validation_fraction)
        if train < 1:
            raise ValueError(f"num_tokens={self.num_tokens} leaves no training context after validation")
        return val, train

    def context_plan(self, limit_training: bool = True) -> ContextPlan:
        """Which contexts of the text are held out and which each rank trains on (one plan per
        DataModule and kind, so the held-out contexts are tokenised once)."""
        if limit_training not in self._plans:
            self._plans[limit_training] = self._new_plan(limit_training)
        return self._plans[limit_training]

    def _new_plan(self, limit_training: bool) -> ContextPlan:
        tokenizer = self.load_tokenizer()
        val, train = self._context_counts()

        def contexts():
            texts = text.dataset_texts(self.dataset, self.dataset_config, self.split, self.text_column, self.streaming,
                                       txt_documents=self.txt_documents, loader_options=self.loader_options)
            return text.pack_contexts(texts, tokenizer, self.context_size, self.prepend_bos)

        return ContextPlan(contexts, val, train if limit_training else None)

    def _exclude_token(self) -> int | Exclusion | None:
        bos = self.load_tokenizer().bos_token_id if self.exclude_bos else None
        return self.exclusion or bos

    @property
    def exclusion(self) -> Exclusion | None:
        """Every position rule beyond BOS alone (BOS included when exclude_bos), or None when
        BOS is all that is left out; the spliced-in evaluation applies the same rules."""
        if not self._exclusion_settings():
            return None
        bos = self.load_tokenizer().bos_token_id if self.exclude_bos else None
        return Exclusion(
            token_ids=tuple(sorted({*self.exclude_tokens, *([bos] if bos is not None else [])})),
            positions=tuple(self.exclude_positions),
            norm_above=self.exclude_norm_above,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ---- the model and tokenizer ------------------------------------------------------------------
    def load_language_model(self) -> PreTrainedModel:
        """The language model (eval mode, parameters frozen), loaded once and kept."""
        if self._model is None:
            self._model = self._fresh_model()
        return self._model

    def _fresh_model(self) -> PreTrainedModel:
        return models.load_model(self.model, self.model_dtype, self._model_device(), self.trust_remote_code, self.revision)

    def _model_device(self) -> str:
        """A stream's model sits on its rank's training device; caching uses `device`."""
        trainer = self.trainer
        if self.source == "stream" and trainer is not None and self.device == "auto":
            return str(trainer.strategy.root_device)
        return self.device

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.model, self.trust_remote_code, self.revision)
        return self._tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.load_tokenizer()

    # ---- the cache ---------------------------------------------------------------------------------
    def _build_cache(self, routing: Routing, writer: int, writers: int) -> Path:
        """Writes (or finishes) this rank's part of the cache; returns its directory."""
        settings = self._settings(routing)
        path = self._cache_path(settings)
        manifest = cache.read_manifest(path)
        if manifest is not None:
            cache.check_settings(manifest, settings, path)
            if manifest["complete"]:
                return path
        plan = self.context_plan()
        val = plan.validation_contexts if writer == 0 else 0
        mine = len(range(writer, plan.training_contexts, writers))
        shards = cache.shard_plan(val, mine, max(1, self.shard_tokens // self.context_size))
        contexts = iter(plan.validation()) if writer == 0 else iter(())
        info = {"library_version": __version__, "model_name": self.model, "dataset_path": self.dataset,
                "sites": routing.sites}
        if (vocab := self._vocab_size()) is not None:
            info["vocab_size"] = vocab  # lets `lightning-sae cache verify` check token ids without the model
        cache.build_cache(
            path,
            settings,
            # A model kept by load_language_model() is reused; otherwise one is loaded just for
            # caching and freed afterwards (training does not need it).
            (lambda: self._model) if self._model is not None else self._fresh_model,
            itertools.chain(contexts, plan.training(writer, writers)),
            roles=routing.roles,
            gradients=routing.gradients,
            plan=shards,
            context_size=self.context_size,
            cache_dtype=self.cache_dtype,
            exclude_token=self._exclude_token(),
            model_batch_size=self.model_batch_size,
            info=info,
            writer=writer,
            writers=writers,
        )
        return path

    # ---- Lightning hooks ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Checks the hook points, then builds (or finishes) the cache when one process writes it
        (with several ranks, `setup` does: every rank writes its part)."""
        routing = self.routing()
        _, world = self._rank_and_world()
        if self.source == "cache" and world == 1:
            self._build_cache(routing, 0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Opens the cache (every rank writing its part first, if it is unfinished) or starts the
        stream's model; without a trainer (standalone use) a cache is built first if needed."""
        routing = self._routing = self.routing()
        self.sites = routing.sites
        if self.source == "stream":
            self._setup_stream(routing)
        else:
            self._setup_cache(routing)
        self._set_metadata(routing)

    def _setup_cache(self, routing: Routing) -> None:
        rank, world = self._rank_and_world()
        settings = self._settings(routing)
        self._know_data(settings)
        path = self._cache_path(settings)
        manifest = cache.read_manifest(path)
        if manifest is None or not manifest["complete"]:
            if world > 1:
                self._build_cache(routing, rank, world)
                self.trainer.strategy.barrier("lightning_sae_cache_parts")
                if rank == 0:
                    cache.merge_writers(path, world)
                self.trainer.strategy.barrier("lightning_sae_cache_merged")
            elif self.trainer is None:
                self._build_cache(routing, 0, 1)
        manifest = self._open_verified(path, settings)
        keys = list(routing.roles) + list(routing.gradients)
        verifier = self._background_verifier(path, manifest)
        # Hashed bytes are the bytes checked finite when written; unhashed validation rows are
        # checked as they are read (training rows are left to NonFiniteGuard: a per-batch check
        # costs ~30% of a bare epoch read, docs/performance.md).
        hashed = verifier is not None or (self.verify == "full" and manifest["format"] >= 3)
        self._readers = {split: cache.ShardReader(path, manifest, split, keys, verifier=verifier,
                                                  check_finite=split == "val" and self.verify != "off" and not hashed)
                         for split in ("train", "val")}
        if self._readers["train"].num_rows < self.batch_size:
            raise ValueError(
                f"only {self._readers['train'].num_rows} training rows, fewer than one batch of {self.batch_size}: "
                "lower batch_size, or raise num_tokens (with another cache_dir, or none)"
            )
        self.widths = {key: manifest["widths"][key] for key in routing.roles}
        self._cache_location = str(path)

    def _vocab_size(self) -> int | None:
        """Rows of the model's input embedding: token ids at or above it cannot be fed to it."""
        embedding = self.model_skeleton().get_input_embeddings()
        return getattr(embedding, "num_embeddings", None) or getattr(self.model_skeleton().config, "vocab_size", None)

    def _background_verifier(self, path: Path, manifest: dict) -> cache.ShardVerifier | None:
        """verify "background": the thread that hashes every shard before a reader serves it
        (none when the open already hashed everything, or for a format-2 cache, which has no hashes)."""
        if self.verify != "background" or self.rebuild_damaged:
            return None
        if manifest["format"] < 3:
            rank_zero_info(f"lightning-sae: the activation cache at {path} was written before content hashes "
                           f"(format {manifest['format']}): only its headers are checked; rebuild it to have every byte checked")
            return None
        return cache.ShardVerifier(path, manifest)

    def _open_verified(self, path: Path, settings: dict) -> dict:
        """The cache's manifest once its shards pass `verify`; with `rebuild_damaged`, rank 0
        first recomputes the damaged shards (found by hashing all of them before the fit, also
        under "background") while the other ranks wait."""
        rank, world = self._rank_and_world()
        vocab = self._vocab_size()
        manifest = None
        if self.rebuild_damaged and rank == 0:
            level = "full" if self.verify == "background" else self.verify
            try:
                manifest = cache.open_cache(path, settings, level, vocab)
            except cache.DamagedCacheError as damaged:
                plan = self.context_plan()
                writers = damaged.manifest.get("writers", 1)

                def writer_contexts(writer: int):
                    return itertools.chain(plan.validation() if writer == 0 else iter(()), plan.training(writer, writers))

                cache.rebuild_shards(
                    path, damaged.manifest, list(damaged.problems),
                    (lambda: self._model) if self._model is not None else self._fresh_model, writer_contexts,
                    exclude_token=self._exclude_token(), model_batch_size=self.model_batch_size,
                )
                manifest = cache.open_cache(path, settings, level, vocab)
        if self.rebuild_damaged and world > 1:
            self.trainer.strategy.barrier("lightning_sae_cache_rebuilt")
        return manifest if manifest is not None else cache.open_cache(path, settings, self.verify, vocab)

    def _setup_stream(self, routing: Routing) -> None:
        model = self.load_language_model()
        probe = torch.full((1, 2), self.load_tokenizer().bos_token_id or 0, dtype=torch.long)
        with torch.inference_mode(False):
            out = Extractor(model, None, routing.roles)(probe.to(next(model.parameters()).device))
        self.widths = {key: value.shape[-1] for key, value in out.items()}
        self._cache_location = None
        self._know_data(self._settings(routing))

    def _set_metadata(self, routing: Routing) -> None:
        skeleton = self.model_skeleton()
        hook_names = {key: hooks.hookpoint_transformer_lens_name(name, skeleton) for key, name in routing.roles.items()}
        first_x = next(key for key in routing.roles if key.rsplit("/", 1)[-1] == "x")
        self.metadata = {
            **(models.embedded_model_metadata() if self.model == models.EMBEDDED_MODEL else {"model_name": self.model}),
            "hook_name": hook_names[first_x],
            "hook_names": hook_names,
            "hookpoints": dict(routing.roles),
            "sites": list(routing.sites),
            "layer": self.layer,
            "hook": self.hook,
            "context_size": self.context_size,
            "dataset_path": self.dataset,
            "prepend_bos": self.prepend_bos,
            **({"exclude": exclusion} if (exclusion := self._exclusion_settings()) else {}),
            "source": self.source,
        }
        if self._cache_location is not None:
            self.metadata["cache_dir"] = self._cache_location

    def _extractor(self, gradients: bool = True) -> Extractor:
        routing = self._routing
        return Extractor(self.load_language_model(), None, routing.roles, routing.gradients if gradients else {})

    def _stream_steps(self, world: int) -> int:
        """Training batches per epoch per rank: the epoch's training contexts, shared by the
        ranks, counted at their rows without BOS (an upper bound when documents are short and
        separating BOS tokens are excluded too)."""
        _, train = self._context_counts()
        rows_per_context = self.context_size - (1 if self.prepend_bos and self.exclude_bos else 0)
        steps = (train // world) * rows_per_context // self.batch_size
        if steps < 1:
            raise ConfigError(f"num_tokens={self.num_tokens} gives each of {world} ranks less than one batch of "
                              f"{self.batch_size} rows per epoch: raise num_tokens or lower batch_size")
        return steps

    def _loader(self, split: str) -> ResumableLoader:
        if self.source == "stream":
            return self._stream_loader(split)
        if not self._readers:
            raise RuntimeError("call setup() before asking for dataloaders")
        reader = self._readers[split]
        training = split == "train"
        batches = ShuffledBatches(reader.num_rows, reader, self.batch_size, seed=self.seed, shuffle=training, drop_remainder=training)
        return ResumableLoader(batches, num_workers=self.num_workers)

    def _stream_loader(self, split: str) -> ResumableLoader:
        if self._routing is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        rank, world = self._rank_and_world()
        plan, exclude = self.context_plan(limit_training=False), self._exclude_token()
        if split == "train":
            extractor = self._extractor()

            def rows(start_row: int):
                return rows_from(plan.training(rank, world, cycle=True), extractor, exclude, self.model_batch_size, start_row)

            dataset = StreamedBatches(rows, self.batch_size, self.buffer_tokens // self.batch_size,
                                      self._stream_steps(world), self.seed, rank, overlap=self.overlap_model_pass)
        else:
            extractor = self._extractor()

            def batches():
                for tokens in groups(plan.validation(rank, world, equal_shares=True), self.model_batch_size):
                    yield extract_rows(extractor, tokens, exclude)

            per_rank = plan.validation_contexts // world
            dataset = StreamedValidation(batches, per_rank, self.model_batch_size)
        return ResumableLoader(dataset, num_workers=0)

    def train_dataloader(self) -> ResumableLoader:
        return self._train_position.track(self._loader("train"))

    def val_dataloader(self) -> ResumableLoader:
        """Held-out rows in order (deterministic); split across ranks like training."""
        return self._loader("val")

    def validation_contexts(self, max_contexts: int) -> Tensor:
        """Held-out token contexts [B, T] (never in a training batch), e.g. for spliced-in evaluation."""
        if self.source == "stream":
            block = list(self.context_plan().validation())[:max_contexts]
            return torch.stack(block) if block else torch.empty(0, 0, dtype=torch.long)
        if not self._readers:
            raise RuntimeError("call setup() before asking for validation contexts")
        return self._readers["val"].contexts(max_contexts)
