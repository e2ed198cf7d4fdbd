"""Tiny local models, tokenizer and text for the data tests: random weights, nothing from the hub."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from lightning_sae.data import ActivationDataModule
from lightning_sae.data_request import DataRequest

FAMILIES = ("llama", "neox", "gpt2")
VOCAB = 256
_WORDS = (
    "the a an one two some every model layer token sparse feature vector cache batch shard reads writes "
    "learns finds keeps drops small large quick slow red green blue bright dark old new first last "
    "river mountain city garden window letter number signal pattern network engine memory story "
    "and or but while because after before under over near far inside outside . , ; !"
).split()


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 30))) for _ in range(count)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(sentences(200), trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
        return LlamaForCausalLM(config)
    if family == "neox":
        config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True, **common)
        return GPTNeoXForCausalLM(config)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common))
    raise ValueError(family)


def save_model(family: str, root: Path) -> Path:
    folder = root / family
    if not folder.is_dir():
        model = make_model(family)
        # Random init leaves norms at identity; perturb them so mlp_in really tests the affine part.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name or "ln" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
        model.save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    return folder


def write_text(root: Path, count: int = 400, name: str = "corpus.txt") -> Path:
    path = root / name
    if not path.is_file():
        path.write_text("\n".join(sentences(count, seed=1)) + "\n")
    return path


class RequestingModule:
    """Stands in for a training module: only what the DataModule asks of it."""

    def __init__(self, request: DataRequest):
        self.request = request

    def data_request(self) -> DataRequest:
        return self.request


class FakeTrainer:
    global_rank, world_size = 0, 1

    def __init__(self, request: DataRequest):
        self.lightning_module = RequestingModule(request)


def datamodule(model_dir: Path, text: Path, cache_dir: Path | None, request: DataRequest | None = None, **kwargs) -> ActivationDataModule:
    """A DataModule on tiny local files whose trainer asks for `request`, caching into cache_dir."""
    options = dict(layer=1, context_size=16, num_tokens=16 * 40, shard_tokens=16 * 8, model_batch_size=4,
                   batch_size=32, device="cpu", validation_fraction=0.1, model_dtype="float32")
    options.update(kwargs)
    dm = ActivationDataModule(model=str(model_dir), dataset=str(text), cache_dir=None if cache_dir is None else str(cache_dir), **options)
    if request is not None:
        dm.trainer = FakeTrainer(request)  # type: ignore[assignment]
    return dm


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


TWO_KEYS = DataRequest(reads={"x": "resid_post", "y": "mlp_out"}, gradients=True)


@pytest.fixture
def two_key_cache(tiny_root, tmp_path_factory) -> Path:
    """A finished cache of the tiny Llama: x = resid_post, y = mlp_out and dL/dx (TWO_KEYS)."""
    folder = tmp_path_factory.mktemp("cache") / "cache"
    datamodule(save_model("llama", tiny_root), write_text(tiny_root), folder, TWO_KEYS).prepare_data()
    return folder


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Keep every cache (ours and the `datasets` library's) inside the test's tmp_path."""
    import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
