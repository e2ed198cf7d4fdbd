"""Transcoder directories as SAELens and EleutherAI sparsify write them.

SAELens (`JumpReLUTranscoder` / `JumpReLUSkipTranscoder`, architecture "jumprelu_transcoder" /
"jumprelu_skip_transcoder"): cfg.json with d_in, d_sae, d_out, apply_b_dec_to_input false, the
hooks in its metadata (hook_name for the input, hook_name_out for the output);
sae_weights.safetensors with W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out],
threshold [d_sae] and W_skip [d_out, d_in]. SAELens has no TopK transcoder (its plain
"(skip_)transcoder" applies ReLU to every latent), so what is written is always a function SAELens
runs as we do: a threshold selector's own thresholds (BatchTopK's), or, for TopK, a threshold
calibrated on training rows (lightning_sae_transcoder.threshold); any other rule is refused. Plain
"(skip_)transcoder" files that record a `k` (written by earlier versions) are still read, as TopK.

sparsify (`--transcode`): `<root>/<module>/` with cfg.json (transcode true, skip_connection) and
sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec, W_skip),
named by the module whose input it reads and whose output it predicts (`layers.N.mlp`).
sparsify's transcoders keep d_out = d_in; its encoder does not subtract b_dec (transcode true).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning_sae.formats import (
    CFG_FILE,
    FormatCannotRunSelector,
    SAELENS_FORMAT_VERSION,
    SAELENS_METADATA_KEYS,
    SAELENS_WEIGHTS,
    SPARSIFY_METADATA_HEADER,
    SPARSIFY_WEIGHTS,
    SAEFormatError,
    check_dtype,
    check_hookpoint,
    read_json,
    read_safetensors,
    write_sae_directory,
)
from lightning_sae_transcoder.sae import Transcoder
from lightning_sae_transcoder.threshold import ThresholdRule

SAELENS_ARCHITECTURES = {False: "jumprelu_transcoder", True: "jumprelu_skip_transcoder"}  # by skip connection
# What earlier versions wrote: SAELens runs these with ReLU; their metadata `k` says TopK was meant.
RELU_ARCHITECTURES = {False: "transcoder", True: "skip_transcoder"}


def saelens_thresholds(sae: Transcoder, calibration: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The [d_sae] JumpReLU thresholds SAELens will run `sae` with, and the metadata saying where
    they came from; FormatCannotRunSelector (one line) when no threshold rule computes its function."""
    rule = sae.selector.saelens_export(sae)
    name = type(sae.selector).__name__
    if rule.architecture == "jumprelu" and set(rule.tensors) == {"threshold"}:
        return rule.tensors["threshold"].to(sae.b_enc.dtype).expand(sae.d_sae), dict(rule.metadata)
    if rule.architecture != "topk":
        raise FormatCannotRunSelector(f"SAELens runs transcoders with ReLU or JumpReLU only; selector {name} selects "
                                      f"otherwise at inference (SAELens architecture {rule.architecture!r}); export it as sparsify")
    if calibration is None:
        raise FormatCannotRunSelector(
            f"SAELens has no TopK transcoder (its skip_transcoder applies ReLU to every latent), and selector {name}'s "
            "transcoder can be written as a JumpReLU one only with a threshold calibrated on training rows, which a fit's "
            "export computes (lightning_sae.calibration.calibrate_threshold); export it as sparsify instead"
        )
    threshold = sae.b_enc.new_full((sae.d_sae,), calibration["threshold"])
    details = {"k": sae.k, "threshold_calibration": dict(calibration)}
    return threshold, {"training_architecture": "topk", "training_architecture_details": details}


def save_saelens_transcoder(
    sae: Transcoder, path: str | Path, metadata: dict[str, Any] | None = None, dtype: str = "float32",
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write `sae` as a SAELens JumpReLU (skip) transcoder directory (cfg.json +
    sae_weights.safetensors). A TopK transcoder needs `calibration` (calibrate_threshold's result
    on training rows); without it, or for a rule no threshold expresses, FormatCannotRunSelector."""
    check_dtype(dtype)
    threshold, rule_metadata = saelens_thresholds(sae, calibration)
    meta: dict[str, Any] = {key: None for key in SAELENS_METADATA_KEYS}
    meta["hook_name_out"] = None
    meta["sae_lens_training_version"] = None  # not trained by SAELens
    meta.update(metadata or {})
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    meta["k"] = sae.k  # the training k; the file itself runs the threshold rule
    meta.update(rule_metadata)
    skip = sae.W_skip is not None
    # The keys SAELens's own (Skip)TranscoderConfig.to_dict() writes.
    cfg = {
        "architecture": SAELENS_ARCHITECTURES[skip],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_out": sae.d_out,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, "threshold": threshold}
    if skip:
        tensors["W_skip"] = sae.W_skip
    path = Path(path)
    write_sae_directory(path, SAELENS_WEIGHTS, tensors, cfg, dtype)
    return path


def load_saelens_transcoder(path: str | Path) -> tuple[Transcoder, dict[str, Any]]:
    """Read a SAELens JumpReLU (skip) transcoder directory as the threshold rule it runs, or a
    plain (skip_)transcoder that records its `k` (earlier exports) as TopK; float32, with its
    metadata (whose `k` is the SAE's k)."""
    path = Path(path)
    cfg = read_json(path / CFG_FILE)
    architecture = cfg.get("architecture")
    known = {*SAELENS_ARCHITECTURES.values(), *RELU_ARCHITECTURES.values()}
    if architecture not in known:
        raise SAEFormatError(f"{path / CFG_FILE}: architecture={architecture!r} is not a transcoder ({sorted(known)})")
    jumprelu = architecture in SAELENS_ARCHITECTURES.values()
    for key, allowed in (("apply_b_dec_to_input", False), ("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, allowed) != allowed:
            raise SAEFormatError(f"{path / CFG_FILE}: {key}={cfg[key]!r} is not supported (expected {allowed!r})")
    metadata = dict(cfg.get("metadata") or {})
    if not isinstance(metadata.get("k"), int):
        raise SAEFormatError(f"{path / CFG_FILE}: no metadata 'k' (not written by lightning-sae); only transcoders that record their k are read")
    d_in, d_sae, d_out, k = (_positive(cfg.get(key, metadata.get(key)), key, path) for key in ("d_in", "d_sae", "d_out", "k"))
    skip = architecture in (SAELENS_ARCHITECTURES[True], RELU_ARCHITECTURES[True])
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    if jumprelu:
        shapes["threshold"] = (d_sae,)
    tensors, _ = read_safetensors(path / SAELENS_WEIGHTS, shapes, f"cfg.json (d_in={d_in}, d_sae={d_sae}, d_out={d_out})")
    tensors["W_enc"] = tensors["W_enc"].T
    selector = None
    if jumprelu:
        selector = ThresholdRule()
        selector.threshold = tensors.pop("threshold").float()
    return _transcoder(tensors, k, skip, selector=selector), metadata


def sparsify_module_name(read_hookpoint: str | None, write_hookpoint: str | None) -> str | None:
    """sparsify's name for a transcoder from `layers.N.mlp_in` to `layers.N.mlp_out`: the MLP
    module, `layers.N.mlp`; None for any other pair of hook points (sparsify cannot name them)."""
    read = re.fullmatch(r"layers\.(\d+)\.mlp_in", read_hookpoint or "")
    write = re.fullmatch(r"layers\.(\d+)\.mlp_out", write_hookpoint or "")
    if read is None or write is None or read[1] != write[1]:
        return None
    return f"layers.{read[1]}.mlp"


def save_sparsify_transcoder(
    sae: Transcoder, root: str | Path, module: str, metadata: dict[str, Any] | None = None, dtype: str = "float32"
) -> Path:
    """Write `sae` as `<root>/<module>/{cfg.json, sae.safetensors}` in sparsify's --transcode layout."""
    check_dtype(dtype)
    check_hookpoint(module)
    rule = sae.selector.saelens_export(sae).architecture
    if rule != "topk":
        # sparsify runs every transcoder with TopK; written as one, this one would compute another function.
        raise FormatCannotRunSelector(f"sparsify runs transcoders with TopK only, but selector {type(sae.selector).__name__} "
                                      f"selects otherwise at inference (SAELens architecture {rule!r}); export it as SAELens")
    if sae.d_out != sae.d_in:
        raise ValueError(f"sparsify's transcoders have d_out = d_in; this one maps {sae.d_in} -> {sae.d_out}")
    # The keys sparsify's SparseCoder.save_to_disk writes; num_latents overrides expansion_factor.
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": bool(sae.unit_decoder),
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": sae.W_skip is not None,
        "transcode": True,  # sparsify's encoder then does not subtract b_dec, as ours does not
        "d_in": sae.d_in,
    }
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    target = Path(root) / module
    write_sae_directory(target, SPARSIFY_WEIGHTS, tensors, cfg, dtype, {SPARSIFY_METADATA_HEADER: json.dumps(metadata or {})})
    return target


def load_sparsify_transcoder(directory: str | Path) -> tuple[Transcoder, dict[str, Any]]:
    """Read a sparsify transcoder directory (`<root>/<module>/`); the metadata includes "module"."""
    directory = Path(directory)
    cfg = read_json(directory / CFG_FILE)
    if cfg.get("transcode") is not True or cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{directory / CFG_FILE}: not a TopK transcoder (transcode={cfg.get('transcode')!r}, "
                             f"activation={cfg.get('activation')!r})")
    d_in = _positive(cfg.get("d_in"), "d_in", directory)
    d_sae = _positive(cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32), "num_latents", directory)
    k = _positive(cfg.get("k", 32), "k", directory)
    skip = bool(cfg.get("skip_connection", False))
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    tensors, header = read_safetensors(directory / SPARSIFY_WEIGHTS, shapes, f"cfg.json (d_in={d_in}, num_latents={d_sae})")
    tensors["W_enc"], tensors["b_enc"] = tensors.pop("encoder.weight"), tensors.pop("encoder.bias")
    sae = _transcoder(tensors, k, skip, normalize_decoder=bool(cfg.get("normalize_decoder", False)))
    try:
        metadata = json.loads(header.get(SPARSIFY_METADATA_HEADER, "{}"))
    except json.JSONDecodeError as error:
        raise SAEFormatError(f"{directory / SPARSIFY_WEIGHTS}: unreadable {SPARSIFY_METADATA_HEADER}: {error}") from None
    return sae, {**metadata, "module": directory.name}


def _transcoder(tensors: dict, k: int, skip: bool, normalize_decoder: bool = False, selector: ThresholdRule | None = None) -> Transcoder:
    """A float32 Transcoder holding these tensors (W_enc in nn.Linear orientation)."""
    d_sae, d_in = tensors["W_enc"].shape
    if k > d_sae:
        raise SAEFormatError(f"k={k} exceeds the {d_sae} latents")
    sae = Transcoder(d_in, d_sae, k, d_out=tensors["W_dec"].shape[1], skip_connection=skip, normalize_decoder=normalize_decoder,
                     selector=selector)
    state = {name: tensor.float().contiguous() for name, tensor in tensors.items()}
    state.update({f"selector.{name}": tensor for name, tensor in sae.selector.state_dict().items()})  # kept as given
    sae.load_state_dict(state)
    return sae


def _positive(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value
