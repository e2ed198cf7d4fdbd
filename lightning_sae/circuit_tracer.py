"""Transcoder folders that circuit-tracer (0.5.0) reads, and reading them back through it.

Two layouts, each with a `config.yaml` (`model_kind`, `feature_input_hook`, `feature_output_hook`,
`scan`, and our own `lightning_sae` block saying how the features were trained and exported):

- `transcoder_set`: one `layer_{i}.safetensors` per layer 0..L-1 with `W_enc` [d_tc, d_model],
  `W_dec` [d_tc, d_model], `b_enc` [d_tc], `b_dec` [d_model], optional `W_skip` [d_model, d_model]
  and `activation_function.threshold` [d_tc] (read by circuit-tracer's `load_relu_transcoder`);
- `cross_layer_transcoder`: `W_enc_{i}.safetensors` (`W_enc_{i}` [d_tc, d_model], `b_enc_{i}`,
  `b_dec_{i}`, optional `threshold_{i}` [d_tc]) and `W_dec_{i}.safetensors` (`W_dec_{i}`
  [d_tc, L - i, d_model]) (read by its `load_clt`).

circuit-tracer encodes `pre = W_enc x + b_enc` (no input centring, as our transcoders) and runs
ReLU, or JumpReLU `pre * (pre > threshold)` when a threshold is stored; its loaders build no
TopK. Every export must run the trained function in the reader or be refused, so:

- a rule with a threshold (JumpReLU) is written with its thresholds: the same function;
- a TopK transcoder is written with a *calibrated* JumpReLU threshold (the caller passes it: per
  layer, the (N k)-th largest pre-activation of N held-out rows, BatchTopK's inference rule, so
  that about k features fire per token). That is not the TopK function: `config.yaml` says so
  (`lightning_sae.exported_activation: jumprelu_calibrated_from_topk`), and `load_circuit_tracer(...,
  activation="topk")` swaps in circuit-tracer's own `TopK(k)` module to run the trained rule exactly.
  Without a calibrated threshold a TopK transcoder is refused (`FormatCannotRunSelector`).

Hooks are TransformerLens names that circuit-tracer maps onto the model: `mlp.hook_in` (the MLP's
input, after the post-attention norm) and `mlp.hook_out` (the MLP's output) for our mlp_in/mlp_out.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_sae.atomic import atomic_directory
from lightning_sae.formats import FormatCannotRunSelector, SAEFormatError

CONFIG_FILE = "config.yaml"
TRANSCODER_SET = "transcoder_set"
CROSS_LAYER_TRANSCODER = "cross_layer_transcoder"
HOOKS = {"mlp_in": "mlp.hook_in", "mlp_out": "mlp.hook_out"}
"""Our hook kinds as the TransformerLens names circuit-tracer's model mappings resolve."""
CALIBRATED = "jumprelu_calibrated_from_topk"


def hook_name(kind: str) -> str:
    if kind not in HOOKS:
        raise FormatCannotRunSelector(f"circuit-tracer reads features between {sorted(HOOKS)}; this transcoder uses {kind!r}")
    return HOOKS[kind]


def save_transcoder_set(
    directory: str | Path,
    layers: Sequence[dict[str, Tensor]],
    *,
    k: int | None,
    thresholds: Sequence[Tensor | float | None],
    input_kind: str = "mlp_in",
    output_kind: str = "mlp_out",
    scan: str = "lightning-sae",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write one transcoder per layer 0..L-1 (`layers[i]`: W_enc [d_tc, d_in] in nn.Linear
    orientation, W_dec [d_tc, d_out], b_enc, b_dec, optional W_skip) in circuit-tracer's
    transcoder_set layout. `thresholds[i]`: the JumpReLU threshold (a scalar or [d_tc]) the reader
    runs; None only for a rule that is ReLU at inference (k None). With `k` (TopK training) the
    thresholds are calibrated ones and config.yaml says so."""
    if len(thresholds) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(thresholds)} thresholds")
    files = {}
    for index, (tensors, threshold) in enumerate(zip(layers, thresholds)):
        out = {name: tensors[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if tensors.get("W_skip") is not None:
            out["W_skip"] = tensors["W_skip"]
        out = _with_threshold(out, "activation_function.threshold", threshold, out["b_enc"].shape[0], k, index)
        files[f"layer_{index}.safetensors"] = out
    config = _config(TRANSCODER_SET, input_kind, output_kind, scan, k, metadata)
    return _write(directory, files, config)


def save_cross_layer_transcoder(
    directory: str | Path,
    W_enc: Sequence[Tensor],
    b_enc: Sequence[Tensor],
    W_dec: Sequence[Tensor],
    b_dec: Tensor,
    *,
    k: int | None,
    thresholds: Sequence[Tensor | float | None],
    input_kind: str = "mlp_in",
    output_kind: str = "mlp_out",
    scan: str = "lightning-sae",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a cross-layer transcoder of L layers: W_enc[i] [d_tc, d_in], b_enc[i] [d_tc], W_dec[i]
    [d_tc, L - i, d_out], b_dec [L, d_out]; thresholds as in `save_transcoder_set`."""
    n_layers = len(W_enc)
    for index, decoder in enumerate(W_dec):
        if decoder.ndim != 3 or decoder.shape[1] != n_layers - index:
            raise ValueError(f"W_dec[{index}] must be [d_tc, {n_layers - index}, d_out], got {list(decoder.shape)}")
    files = {}
    for index in range(n_layers):
        encoder = {f"W_enc_{index}": W_enc[index], f"b_enc_{index}": b_enc[index], f"b_dec_{index}": b_dec[index]}
        files[f"W_enc_{index}.safetensors"] = _with_threshold(encoder, f"threshold_{index}", thresholds[index], b_enc[index].shape[0], k, index)
        files[f"W_dec_{index}.safetensors"] = {f"W_dec_{index}": W_dec[index]}
    config = _config(CROSS_LAYER_TRANSCODER, input_kind, output_kind, scan, k, metadata)
    return _write(directory, files, config)


def _with_threshold(tensors: dict[str, Tensor], key: str, threshold: Tensor | float | None, d_tc: int, k: int | None, index: int) -> dict[str, Tensor]:
    if threshold is None:
        if k is not None:
            raise FormatCannotRunSelector(
                f"layer {index} is a TopK transcoder, which circuit-tracer 0.5.0 cannot run (its loaders build ReLU or "
                "JumpReLU); export it with a threshold calibrated on held-out activations (the fit's end-of-training "
                "export does this)"
            )
        return tensors
    threshold = torch.as_tensor(threshold, dtype=torch.float32)
    if threshold.ndim == 0:
        if not math.isfinite(float(threshold)):
            raise FormatCannotRunSelector(f"layer {index}: no calibrated threshold (NaN): no held-out rows were seen to calibrate it on")
        threshold = threshold.expand(d_tc)
    return {**tensors, key: threshold}


def _config(kind: str, input_kind: str, output_kind: str, scan: str, k: int | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    ours = {"exported_activation": CALIBRATED if k is not None else "jumprelu_or_relu_as_trained", **(metadata or {})}
    if k is not None:
        ours["k"] = k
        ours["note"] = ("trained with TopK (k per layer and token); the stored thresholds are calibrated so that about k "
                        "features fire per token on held-out rows; load_circuit_tracer(..., activation='topk') runs TopK exactly")
    return {
        "model_kind": kind,
        "feature_input_hook": hook_name(input_kind),
        "feature_output_hook": hook_name(output_kind),
        "scan": scan,
        "lightning_sae": _plain(ours),
    }


def _plain(value: Any) -> Any:
    """YAML-safe plain values (tuples, tensors and paths out of metadata)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write(directory: str | Path, files: dict[str, dict[str, Tensor]], config: dict[str, Any]) -> Path:
    import yaml

    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise FileExistsError(f"{target} exists and is not a circuit-tracer transcoder folder; refusing to replace it")
    with atomic_directory(target) as tmp:
        for name, tensors in files.items():
            save_file({key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}, str(tmp / name))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def read_config(directory: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(directory) / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SAEFormatError(f"{path}: not a readable circuit-tracer config: {error}") from None
    if not isinstance(config, dict) or config.get("model_kind") not in (TRANSCODER_SET, CROSS_LAYER_TRANSCODER):
        raise SAEFormatError(f"{path}: model_kind must be {TRANSCODER_SET!r} or {CROSS_LAYER_TRANSCODER!r}")
    return config


def import_circuit_tracer():
    """circuit_tracer, imported; a clear ImportError when the `circuits` extra is not installed.

    circuit-tracer 0.5.0 imports `huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER`, which
    huggingface_hub 1.x removed (its metadata pins huggingface-hub<1 and transformers<=4.57.3);
    setting the flag to its old default (False) before the import lets it run beside the newer
    transformers this library uses. Nothing is downloaded either way."""
    import huggingface_hub.constants as hub_constants

    if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False
    try:
        import circuit_tracer
    except ImportError as error:
        raise ImportError(f"circuit-tracer is not installed ({error}): pip install -e '.[circuits]'") from error
    return circuit_tracer


def load_circuit_tracer(directory: str | Path, activation: str = "exported", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The folder loaded by circuit-tracer's own loaders (a TranscoderSet or CrossLayerTranscoder).

    activation: "exported" runs what the files say (ReLU or JumpReLU); "topk" replaces the
    activation by circuit-tracer's own `TopK(k)` for a folder trained with TopK (config k)."""
    import_circuit_tracer()
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    if activation not in ("exported", "topk"):
        raise ValueError(f"activation must be 'exported' or 'topk', got {activation!r}")
    directory = Path(directory)
    config = read_config(directory)
    hooks = {"feature_input_hook": config["feature_input_hook"], "feature_output_hook": config["feature_output_hook"], "scan": config.get("scan")}
    if config["model_kind"] == TRANSCODER_SET:
        count = len(list(directory.glob("layer_*.safetensors")))
        paths = {index: str(directory / f"layer_{index}.safetensors") for index in range(count)}
        loaded = load_transcoder_set(paths, device=torch.device(device), dtype=dtype, lazy_encoder=False, lazy_decoder=False, **hooks)
    else:
        loaded = load_clt(str(directory), device=torch.device(device), dtype=dtype, lazy_encoder=False, lazy_decoder=False, **hooks)
    if activation == "topk":
        k = (config.get("lightning_sae") or {}).get("k")
        if not isinstance(k, int):
            raise SAEFormatError(f"{directory / CONFIG_FILE}: activation='topk' needs lightning_sae.k (a TopK-trained export)")
        if config["model_kind"] == TRANSCODER_SET:
            for transcoder in loaded:
                transcoder.activation_function = TopK(k)
        else:
            loaded.activation_function = TopK(k)
    return loaded


def export_checkpoint(path: str | Path, directory: str | Path) -> tuple[Path, str]:
    """A fit's checkpoint written in circuit-tracer's layout by its own variant (the class the
    checkpoint names, found among the registered variants), through the variant's
    `save_circuit_tracer(directory)`. Returns (where, the variant's class name)."""
    module = module_from_checkpoint(path)
    if not hasattr(module, "save_circuit_tracer"):
        raise FormatCannotRunSelector(f"{type(module).__name__} has no circuit-tracer layout (transcoders on every layer or a cross-layer transcoder do)")
    return module.save_circuit_tracer(directory), type(module).__name__


def module_from_checkpoint(path: str | Path):
    """The training module of a `lightning-sae fit` checkpoint, rebuilt by the class it names
    (hyper_parameters["_class_path"], a registered variant), weights loaded, on the CPU."""
    import importlib

    from lightning_sae.registry import VARIANTS, load_plugins

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never runs code
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # refused, truncated or missing
        raise SAEFormatError(f"{path} is not a readable checkpoint: {error}") from None
    if not isinstance(checkpoint, dict):
        raise SAEFormatError(f"{path} is not a Lightning checkpoint")
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise SAEFormatError(f"{path}: the checkpoint does not name its training module (hyper_parameters['_class_path'])")
    load_plugins(VARIANTS)  # registers the aliases lightning_sae.registered.<name>
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise SAEFormatError(f"{path}: its training module {class_path!r} is not installed: {error}") from None
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
