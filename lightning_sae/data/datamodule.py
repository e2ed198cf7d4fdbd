"""ActivationDataModule: language-model activations cached on disk, served as shuffled batches."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import lightning as L
from torch import Tensor
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

import lightning_sae
from lightning_sae.batching import LoaderPosition, ResumableLoader, ShuffledBatches
from lightning_sae.data import cache, hooks, models, text
from lightning_sae.data_request import DataRequest, request_of

# What the embedded default was quantised from: the name SAELens/TransformerLens tools know it by.
_EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ActivationDataModule(L.LightningDataModule):
    """Caches the activations a training module asks for (its `data_request()`) in one model pass,
    then serves them as shuffled float32 batches {role: [B, D], ..., "grad": [B, D]}.

    Caching happens in `prepare_data` (once per node, rank 0); `setup` only opens the finished
    cache. A cache is identified by its settings: with `cache_dir` unset it lives under the user
    cache directory in a folder named by a hash of them; a given `cache_dir` holding a cache made
    with other settings is an error naming the differing fields, never silently reused.

    Args:
        model: "smollm2-135m" (the embedded SmolLM2-135M GGUF, no download), a hub name or a local folder.
        model_dtype: float32, float16 or bfloat16 for the model's weights and activations.
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]" for the caching forward passes.
        trust_remote_code: allow a hub model's own code to run (off unless asked).
        revision: hub revision (branch, tag or commit) of the model.
        layer: decoder layer whose activations are cached (15 is the middle of SmolLM2-135M's 30).
        hook: resid_pre, resid_post, mlp_in or mlp_out; used by roles the request leaves open (None).
        dataset: "python-docs" (English shipped with Python, no download), a `datasets` hub name, a
            local folder, or local text/json/jsonl/parquet/csv files as a path or glob.
        dataset_config: the `datasets` configuration name, if any.
        split: dataset split to read.
        text_column: the column holding the text.
        streaming: stream the dataset instead of downloading and preparing it whole.
        context_size: tokens per context (BOS included).
        prepend_bos: start every context with the BOS token.
        exclude_bos: leave positions holding BOS out of the cache (contexts are packed, so there is
            no padding to exclude).
        num_tokens: tokens to run through the model (contexts x context_size), validation included.
        validation_fraction: share of those contexts held out for validation (taken first).
        cache_dir: where the cache lives; None: <user cache>/lightning-sae/activations/<settings hash>.
        cache_dtype: float32, float16 or bfloat16 on disk (batches are always float32).
        shard_tokens: tokens per shard file (a resumed run restarts at the last complete shard).
        model_batch_size: contexts per forward pass while caching.
        batch_size: rows (tokens) per training batch, per rank.
        num_workers: DataLoader worker processes.
        seed: shuffling seed.
    """

    def __init__(
        self,
        model: str = models.EMBEDDED_MODEL,
        model_dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        layer: int = 15,
        hook: str = "resid_post",
        dataset: str = text.EMBEDDED_CORPUS,
        dataset_config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        context_size: int = 128,
        prepend_bos: bool = True,
        exclude_bos: bool = True,
        num_tokens: int = 200_000,
        validation_fraction: float = 0.05,
        cache_dir: str | None = None,
        cache_dtype: str = "float32",
        shard_tokens: int = 65_536,
        model_batch_size: int = 16,
        batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        hooks.check_kind(hook)
        models.torch_dtype(model_dtype)
        models.torch_dtype(cache_dtype)
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if num_tokens < context_size:
            raise ValueError(f"num_tokens ({num_tokens}) must be at least one context ({context_size})")
        self.save_hyperparameters()
        self.model, self.model_dtype, self.device = model, model_dtype, device
        self.trust_remote_code, self.revision = trust_remote_code, revision
        self.layer, self.hook = layer, hook
        self.dataset, self.dataset_config, self.split = dataset, dataset_config, split
        self.text_column, self.streaming = text_column, streaming
        self.context_size, self.prepend_bos, self.exclude_bos = context_size, prepend_bos, exclude_bos
        self.num_tokens, self.validation_fraction = num_tokens, validation_fraction
        self.cache_dir, self.cache_dtype, self.shard_tokens = cache_dir, cache_dtype, shard_tokens
        self.model_batch_size, self.batch_size = model_batch_size, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.widths: dict[str, int] = {}
        self.metadata: dict = {}
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._readers: dict[str, cache.ShardReader] = {}
        self._train_position = LoaderPosition()  # the training loader's place, through checkpoints

    def state_dict(self) -> dict:
        return self._train_position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._train_position.load_state_dict(state)

    # ---- the request and the settings that identify a cache ------------------------------------
    def _request(self) -> DataRequest:
        return request_of(self.trainer)

    def _roles(self, request: DataRequest) -> dict[str, str]:
        if "x" not in request.roles:
            raise ValueError(f"a DataRequest needs a role 'x'; got roles {sorted(request.roles)}")
        roles = {key: kind or self.hook for key, kind in request.roles.items()}
        for kind in roles.values():
            hooks.check_kind(kind)
        return roles

    def _dataset_identity(self) -> dict:
        if self.dataset == text.EMBEDDED_CORPUS:
            return {"name": text.python_docs_identity()}
        files = text.local_files(self.dataset)
        if files:
            return {"files": [os.path.abspath(f) for f in files], "fingerprint": models.fingerprint([Path(f) for f in files])}
        return {"name": self.dataset, "config": self.dataset_config}

    def _settings(self, roles: dict[str, str], gradients: bool) -> dict:
        """Everything that decides the cache's contents (not model_batch_size or device, which
        change results only by floating-point rounding)."""
        return {
            "model": models.model_identity(self.model, self.revision, self.trust_remote_code),
            "model_dtype": self.model_dtype,
            "layer": self.layer,
            "roles": roles,
            "gradients": gradients,
            "dataset": self._dataset_identity(),
            "split": self.split,
            "text_column": self.text_column,
            "streaming": self.streaming,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "exclude_bos": self.exclude_bos,
            "num_tokens": self.num_tokens,
            "validation_fraction": self.validation_fraction,
            "cache_dtype": self.cache_dtype,
            "shard_tokens": self.shard_tokens,
        }

    def _cache_path(self, settings: dict) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return models.user_cache_dir() / "activations" / digest

    def _plan(self) -> list[tuple[str, int]]:
        contexts = math.ceil(self.num_tokens / self.context_size)
        val = math.ceil(contexts * self.validation_fraction) if self.validation_fraction > 0 else 0
        if contexts - val < 1:
            raise ValueError(f"num_tokens={self.num_tokens} leaves no training context after validation")
        return cache.shard_plan(val, contexts - val, max(1, self.shard_tokens // self.context_size))

    # ---- the model and tokenizer ------------------------------------------------------------------
    def load_language_model(self) -> PreTrainedModel:
        """The language model (eval mode, parameters frozen), loaded once and kept."""
        if self._model is None:
            self._model = self._fresh_model()
        return self._model

    def _fresh_model(self) -> PreTrainedModel:
        return models.load_model(self.model, self.model_dtype, self.device, self.trust_remote_code, self.revision)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.model, self.trust_remote_code, self.revision)
        return self._tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.load_tokenizer()

    # ---- Lightning hooks ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Builds (or finishes) the cache for the training module's request; runs once per node."""
        request = self._request()
        roles = self._roles(request)
        settings = self._settings(roles, request.gradients)
        path = self._cache_path(settings)
        manifest = cache.read_manifest(path)
        if manifest is not None:
            cache.check_settings(manifest, settings, path)
            if manifest["complete"]:
                return
        config = AutoConfig.from_pretrained(
            models.model_location(self.model), revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        if not 0 <= self.layer < config.num_hidden_layers:
            raise ValueError(f"layer {self.layer} does not exist: the model has layers 0..{config.num_hidden_layers - 1}")
        tokenizer = self.load_tokenizer()
        texts = text.dataset_texts(self.dataset, self.dataset_config, self.split, self.text_column, self.streaming)
        cache.build_cache(
            path,
            settings,
            # A model kept by load_language_model() is reused; otherwise one is loaded just for
            # caching and freed afterwards (training does not need it).
            (lambda: self._model) if self._model is not None else self._fresh_model,
            text.pack_contexts(texts, tokenizer, self.context_size, self.prepend_bos),
            layer=self.layer,
            roles=roles,
            gradients=request.gradients,
            plan=self._plan(),
            context_size=self.context_size,
            cache_dtype=self.cache_dtype,
            exclude_token=tokenizer.bos_token_id if self.exclude_bos else None,
            model_batch_size=self.model_batch_size,
            info={"library_version": lightning_sae.__version__, "model_name": self.model, "dataset_path": self.dataset},
        )

    def setup(self, stage: str | None = None) -> None:
        """Opens the finished cache; without a trainer (standalone use) it is built first if needed."""
        request = self._request()
        roles = self._roles(request)
        settings = self._settings(roles, request.gradients)
        path = self._cache_path(settings)
        if self.trainer is None:
            manifest = cache.read_manifest(path)
            if manifest is None or not manifest["complete"]:
                self.prepare_data()
        manifest = cache.open_cache(path, settings)
        keys = list(roles) + (["grad"] if request.gradients else [])
        self._readers = {split: cache.ShardReader(path, manifest, split, keys) for split in ("train", "val")}
        if self._readers["train"].num_rows < self.batch_size:
            raise ValueError(
                f"only {self._readers['train'].num_rows} training rows, fewer than one batch of {self.batch_size}: "
                "lower batch_size, or raise num_tokens (with another cache_dir, or none)"
            )
        self.widths = {key: manifest["widths"][key] for key in roles}
        hook_names = {key: hooks.transformer_lens_name(self.layer, kind) for key, kind in roles.items()}
        self.metadata = {
            "model_name": _EMBEDDED_HUB_NAME if self.model == models.EMBEDDED_MODEL else self.model,
            "hook_name": hook_names["x"],
            "hook_names": hook_names,
            "layer": self.layer,
            "hook": roles["x"],
            "context_size": self.context_size,
            "dataset_path": self.dataset,
            "prepend_bos": self.prepend_bos,
            "cache_dir": str(path),
        }

    def _loader(self, split: str) -> ResumableLoader:
        if not self._readers:
            raise RuntimeError("call setup() before asking for dataloaders")
        reader = self._readers[split]
        training = split == "train"
        batches = ShuffledBatches(reader.num_rows, reader, self.batch_size, seed=self.seed, shuffle=training, drop_remainder=training)
        return ResumableLoader(batches, num_workers=self.num_workers)

    def train_dataloader(self) -> ResumableLoader:
        return self._train_position.track(self._loader("train"))

    def val_dataloader(self) -> ResumableLoader:
        """Held-out rows in cache order (deterministic); split across ranks like training."""
        return self._loader("val")

    def validation_contexts(self, max_contexts: int) -> Tensor:
        """Held-out token contexts [B, T] (never in a training batch), e.g. for spliced-in evaluation."""
        if not self._readers:
            raise RuntimeError("call setup() before asking for validation contexts")
        return self._readers["val"].contexts(max_contexts)
