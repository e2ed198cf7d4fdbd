"""Transcoder directories as SAELens and EleutherAI sparsify write them.

SAELens (`Transcoder` / `SkipTranscoder`, architecture "transcoder" / "skip_transcoder"):
cfg.json with d_in, d_sae, d_out, apply_b_dec_to_input false, the hooks in its metadata
(hook_name for the input, hook_name_out for the output); sae_weights.safetensors with W_enc
[d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out] and W_skip [d_out, d_in]. SAELens has
no TopK transcoder class: its `encode` is ReLU of every pre-activation, so the TopK function is
SAELens's decode of the k largest of its encode (plus W_skip x); the metadata's `k` says so.

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

SAELENS_ARCHITECTURES = {False: "transcoder", True: "skip_transcoder"}  # by skip connection


def save_saelens_transcoder(sae: Transcoder, path: str | Path, metadata: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
    """Write `sae` as a SAELens transcoder directory (cfg.json + sae_weights.safetensors)."""
    check_dtype(dtype)
    meta: dict[str, Any] = {key: None for key in SAELENS_METADATA_KEYS}
    meta["hook_name_out"] = None
    meta["sae_lens_training_version"] = None  # not trained by SAELens
    meta.update(metadata or {})
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    meta["k"] = sae.k  # the selection SAELens's ReLU Transcoder does not apply (module docstring)
    skip = sae.W_skip is not None
    # The keys SAELens's own (Skip)TranscoderConfig.to_dict() writes.
    cfg = {
        "architecture": sae.saelens_architecture(),
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
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if skip:
        tensors["W_skip"] = sae.W_skip
    path = Path(path)
    write_sae_directory(path, SAELENS_WEIGHTS, tensors, cfg, dtype)
    return path


def load_saelens_transcoder(path: str | Path) -> tuple[Transcoder, dict[str, Any]]:
    """Read a SAELens (skip_)transcoder directory that records its `k` (float32, with its metadata)."""
    path = Path(path)
    cfg = read_json(path / CFG_FILE)
    architecture = cfg.get("architecture")
    if architecture not in SAELENS_ARCHITECTURES.values():
        raise SAEFormatError(f"{path / CFG_FILE}: architecture={architecture!r} is not a transcoder ({sorted(SAELENS_ARCHITECTURES.values())})")
    for key, allowed in (("apply_b_dec_to_input", False), ("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, allowed) != allowed:
            raise SAEFormatError(f"{path / CFG_FILE}: {key}={cfg[key]!r} is not supported (expected {allowed!r})")
    metadata = dict(cfg.get("metadata") or {})
    if not isinstance(metadata.get("k"), int):
        raise SAEFormatError(f"{path / CFG_FILE}: a ReLU transcoder (no metadata 'k'); only TopK transcoders are read")
    d_in, d_sae, d_out, k = (_positive(cfg.get(key, metadata.get(key)), key, path) for key in ("d_in", "d_sae", "d_out", "k"))
    skip = architecture == SAELENS_ARCHITECTURES[True]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    tensors, _ = read_safetensors(path / SAELENS_WEIGHTS, shapes, f"cfg.json (d_in={d_in}, d_sae={d_sae}, d_out={d_out})")
    tensors["W_enc"] = tensors["W_enc"].T
    return _transcoder(tensors, k, skip), metadata


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


def _transcoder(tensors: dict, k: int, skip: bool, normalize_decoder: bool = False) -> Transcoder:
    """A float32 Transcoder holding these tensors (W_enc in nn.Linear orientation)."""
    d_sae, d_in = tensors["W_enc"].shape
    if k > d_sae:
        raise SAEFormatError(f"k={k} exceeds the {d_sae} latents")
    sae = Transcoder(d_in, d_sae, k, d_out=tensors["W_dec"].shape[1], skip_connection=skip, normalize_decoder=normalize_decoder)
    sae.load_state_dict({name: tensor.float().contiguous() for name, tensor in tensors.items()})
    return sae


def _positive(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value
