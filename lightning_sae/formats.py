"""Interchange formats (SPEC section 5): SAELens v6 and EleutherAI sparsify directories.

Both formats compute the same function as `TopKSAE`: relu(W_enc (x - b_dec) + b_enc), keep the
top k, decode with W_dec and add b_dec. SAELens stores W_enc transposed ([d_in, d_sae]);
sparsify stores it as an nn.Linear (`encoder.weight` [d_sae, d_in]) and, like us, subtracts b_dec
before the encoder, so neither direction needs any bias folding. The only folding is on SAELens
import with `rescale_acts_by_decoder_norm`, whose decoder norms are moved into the encoder.

Weights are read and written only as safetensors (never pickle). Every save builds the directory
under a temporary name next to the target and renames it into place, so a reader never sees a
half-written SAE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_sae.atomic import atomic_directory
from lightning_sae.sae import TopKSAE
from lightning_sae.selection import Selector, TopK

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

# Written as the metadata's sae_lens_version: SAELens treats anything older than 6.0.0 as a legacy
# config and rewrites it, and 6.0.0 is the config layout this module produces.
SAELENS_FORMAT_VERSION = "6.0.0"
# The metadata keys SPEC section 5 asks for; written as null when the caller does not know them.
SAELENS_METADATA_KEYS = ("model_name", "hook_name", "context_size", "dataset_path", "prepend_bos")
# sparsify's cfg.json has no metadata slot (its loader drops unknown keys with a printed warning),
# so our metadata travels as JSON in the safetensors header, which sparsify ignores.
SPARSIFY_METADATA_HEADER = "lightning_sae_metadata"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class SAEFormatError(ValueError):
    """A directory or file that does not hold a valid SAE in the expected format."""


class FormatCannotRunSelector(ValueError):
    """An SAE whose selector's inference rule the target format has no way to express."""


# ---- SAELens v6 ------------------------------------------------------------------------------------


def save_saelens(sae: TopKSAE, path: str | Path, metadata: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
    """Write `sae` as a SAELens v6 directory (cfg.json + sae_weights.safetensors): "topk", or the
    architecture its selector's `saelens_export` names (e.g. "jumprelu" for BatchTopK)."""
    _check_dtype(dtype)
    meta: dict[str, Any] = {key: None for key in SAELENS_METADATA_KEYS}
    meta["sae_lens_training_version"] = None  # not trained by SAELens; absent, SAELens would claim it was
    meta.update(metadata or {})
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    # The selector says how SAELens runs it at inference: "topk" with k for TopK-like rules,
    # another architecture (and its weights, e.g. a threshold) for the rest.
    export = sae.selector.saelens_export(sae)
    meta.update(export.metadata)
    # A variant's own training description (Matryoshka's) wins over its selector's.
    meta.update({key: value for key, value in (metadata or {}).items() if key.startswith("training_architecture")})
    # Exactly the keys SAELens's own config's to_dict() writes, so nothing is left to defaults.
    cfg = {
        "architecture": export.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **export.cfg,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    clash = set(tensors) & set(export.tensors)
    if clash:
        raise ValueError(f"{sae.selector.class_name()}.saelens_export returned tensors {sorted(clash)} that every SAE already writes")
    tensors.update(export.tensors)
    path = Path(path)
    write_sae_directory(path, SAELENS_WEIGHTS, tensors, cfg, dtype)
    return path


def load_saelens(path: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """Read a SAELens v6 directory; returns the SAE (float32) and the cfg's metadata.

    "topk" is read by the core; any other architecture by the registered selector that names it
    in `saelens_architectures` (e.g. the batch_topk plugin reads BatchTopK's "jumprelu" export)."""
    path = Path(path)
    cfg = _read_json(path / CFG_FILE)
    architecture = cfg.get("architecture")
    selector_class = None if architecture == "topk" else _saelens_selector_class(architecture)
    if architecture != "topk" and selector_class is None:
        raise SAEFormatError(f"{path / CFG_FILE}: architecture={architecture!r} is not supported (expected 'topk', "
                             f"or one a registered selector reads: {_saelens_architectures() or 'none installed'})")
    for key, allowed in (
        ("apply_b_dec_to_input", (True,)),
        ("normalize_activations", ("none",)),
        ("reshape_activations", ("none",)),
    ):
        # Missing keys take SAELens's defaults, which are the allowed values.
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise SAEFormatError(f"{path / CFG_FILE}: {key}={value!r} is not supported (expected {allowed[0]!r})")
    d_in, d_sae = (_positive_int(cfg, key, path / CFG_FILE) for key in ("d_in", "d_sae"))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    tensors, _ = _read_safetensors(path / SAELENS_WEIGHTS, shapes, f"cfg.json (d_in={d_in}, d_sae={d_sae})",
                                   allow_extra=selector_class is not None)
    W_enc, b_enc, W_dec = tensors["W_enc"].T, tensors["b_enc"], tensors["W_dec"]
    if selector_class is not None:
        extra = {name: tensor for name, tensor in tensors.items() if name not in shapes}
        selector, k = _read_saelens_selector(path, architecture, cfg, extra)
        if not 1 <= k <= d_sae:
            raise SAEFormatError(f"{path}: {selector.class_name()}.from_saelens gave k={k}, outside 1..d_sae={d_sae}")
        return sae_from_tensors(W_enc, b_enc, W_dec, tensors["b_dec"], k, selector), dict(cfg.get("metadata") or {})
    _, _, k = _dimensions(cfg, path / CFG_FILE, d_sae_key="d_sae")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens multiplies the pre-activations by |W_dec[i]| and divides the kept values by it
        # before decoding; scaling encoder row i up and decoder row i down by the same positive
        # norm computes the identical function with plain selection (relu commutes with it).
        norms = W_dec.norm(dim=1)
        W_enc, b_enc = W_enc * norms[:, None], b_enc * norms
        W_dec = W_dec / norms.clamp_min(torch.finfo(norms.dtype).tiny)[:, None]
    sae = sae_from_tensors(W_enc, b_enc, W_dec, tensors["b_dec"], k)
    return sae, dict(cfg.get("metadata") or {})


def _saelens_selector_class(architecture: object) -> type[Selector] | None:
    candidates = _saelens_candidates(architecture)
    return candidates[0] if candidates else None


def _saelens_candidates(architecture: object, metadata: dict[str, Any] | None = None) -> list[type[Selector]]:
    """The registered selectors that read `architecture`, those the file's metadata names first:
    its `selector` (the class path our exports record), then its `training_architecture` among a
    selector's `saelens_training_architectures`; the rest after, in registration order."""
    from lightning_sae.registry import SELECTORS, load_plugins

    candidates = [cls for cls in dict.fromkeys(load_plugins(SELECTORS).values()) if architecture in cls.saelens_architectures]
    metadata = metadata or {}
    named = metadata.get("selector")
    named = named.get("class_path") if isinstance(named, dict) else named
    training = metadata.get("training_architecture")

    def rank(cls: type[Selector]) -> int:
        if isinstance(named, str) and named == f"{cls.__module__}.{cls.__qualname__}":
            return 0
        if training is not None and training in cls.saelens_training_architectures:
            return 1
        return 2

    return sorted(candidates, key=rank)


def _read_saelens_selector(path: Path, architecture: object, cfg: dict[str, Any], extra: dict[str, Tensor]) -> tuple[Selector, int]:
    """The selector of a SAELens directory: the candidates (`_saelens_candidates`) are asked in
    turn, and the first whose `from_saelens` accepts the file reads it."""
    candidates = _saelens_candidates(architecture, cfg.get("metadata") or {})
    refusals = []
    for cls in candidates:
        try:
            return cls.from_saelens(cfg, extra)
        except ValueError as error:
            refusals.append(f"{cls.__qualname__}: {error}")
    names = ", ".join(cls.__qualname__ for cls in candidates)
    raise SAEFormatError(f"{path}: no registered selector reads this {architecture!r} SAE (candidates {names}): " + "; ".join(refusals))


def _saelens_architectures() -> list[str]:
    from lightning_sae.registry import SELECTORS, load_plugins

    return sorted({name for cls in load_plugins(SELECTORS).values() for name in cls.saelens_architectures})


# ---- EleutherAI sparsify ----------------------------------------------------------------------------


def save_sparsify(
    sae: TopKSAE,
    path: str | Path,
    hookpoint: str,
    metadata: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write `sae` as `<path>/<hookpoint>/{cfg.json, sae.safetensors}`; other hookpoints under
    `path` are left alone. Returns the hookpoint directory."""
    _check_dtype(dtype)
    _check_hookpoint(hookpoint)
    rule = sae.selector.saelens_export(sae).architecture
    if rule != "topk":
        # sparsify runs every SAE with TopK; written as one, this SAE would compute another function.
        raise FormatCannotRunSelector(f"sparsify runs SAEs with TopK only, but this SAE's selector {sae.selector.class_name()} "
                         f"selects otherwise at inference (SAELens architecture {rule!r}); export it as SAELens")
    # The keys sparsify's SparseCoder.save_to_disk writes. num_latents overrides expansion_factor,
    # which is only informative here.
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,  # false: sparsify subtracts b_dec from the input, as we do
        "d_in": sae.d_in,
    }
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    header = {SPARSIFY_METADATA_HEADER: json.dumps(metadata or {})}
    target = Path(path) / hookpoint
    write_sae_directory(target, SPARSIFY_WEIGHTS, tensors, cfg, dtype, header)
    return target


def load_sparsify(path: str | Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Read a sparsify SAE. `path` is either a hookpoint directory itself or the directory holding
    hookpoint directories; without `hookpoint` that must hold exactly one. The returned metadata
    includes "hookpoint"."""
    root = Path(path)
    if hookpoint is not None:
        _check_hookpoint(hookpoint)
        directory = root / hookpoint
    elif (root / CFG_FILE).is_file():
        directory = root
    else:
        found = sparsify_hookpoints(root)
        if len(found) != 1:
            what = f"several hookpoints {found}; pass hookpoint=" if found else "no <hookpoint>/cfg.json + sae.safetensors"
            raise SAEFormatError(f"{root}: {what}")
        directory = root / found[0]
    cfg = _read_json(directory / CFG_FILE)
    for key, allowed in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        # Missing keys take sparsify's defaults, which are the allowed values.
        if cfg.get(key, allowed) != allowed:
            raise SAEFormatError(f"{directory / CFG_FILE}: {key}={cfg[key]!r} is not supported (expected {allowed!r})")
    if "d_in" not in cfg:
        raise SAEFormatError(f"{directory / CFG_FILE}: missing 'd_in'")
    # Mirror sparsify's defaults (num_latents 0 -> d_in * expansion_factor, expansion 32, k 32) so we
    # read the same SAE its loader would.
    cfg = {"k": 32, **cfg}
    if not cfg.get("num_latents"):
        cfg["num_latents"] = _positive_int(cfg, "d_in", directory / CFG_FILE) * cfg.get("expansion_factor", 32)
    d_in, d_sae, k = _dimensions(cfg, directory / CFG_FILE, d_sae_key="num_latents")
    tensors, header = _read_safetensors(
        directory / SPARSIFY_WEIGHTS,
        {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        f"cfg.json (d_in={d_in}, num_latents={d_sae})",
    )
    sae = sae_from_tensors(tensors["encoder.weight"], tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"], k)
    try:
        metadata = json.loads(header.get(SPARSIFY_METADATA_HEADER, "{}"))
    except json.JSONDecodeError as error:
        raise SAEFormatError(f"{directory / SPARSIFY_WEIGHTS}: unreadable {SPARSIFY_METADATA_HEADER}: {error}") from None
    return sae, {**metadata, "hookpoint": directory.name}


def sparsify_hookpoints(root: str | Path) -> list[str]:
    """Names of the subdirectories of `root` that hold a sparsify SAE (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        # Dot-names are our temporary directories (or hidden ones), never hookpoints.
        if not child.name.startswith(".") and (child / CFG_FILE).is_file() and (child / SPARSIFY_WEIGHTS).is_file()
    )


# ---- detection -------------------------------------------------------------------------------------


def load_sae(path: str | Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load an SAE from a SAELens or sparsify directory, telling them apart by their files."""
    path = Path(path)
    if not path.is_dir():
        raise SAEFormatError(f"{path} is not a directory (expected a SAELens or sparsify SAE directory)")
    if hookpoint is None and (path / CFG_FILE).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path)
    if hookpoint is not None or (path / SPARSIFY_WEIGHTS).is_file() or sparsify_hookpoints(path):
        return load_sparsify(path, hookpoint)
    present = sorted(child.name for child in path.iterdir())
    raise SAEFormatError(
        f"{path} holds no recognised SAE. Expected either SAELens ({CFG_FILE} + {SAELENS_WEIGHTS}) or "
        f"sparsify ({CFG_FILE} + {SPARSIFY_WEIGHTS}, directly or in <hookpoint>/); found {present}"
    )


# ---- decoder norms ------------------------------------------------------------------------------------

UNIT_NORM_TOLERANCE = 1e-3
"""Decoder rows whose norms are within this of 1 (e.g. a unit-norm SAE saved in bfloat16) count as
unit norm: renormalising them changes the SAE by no more than its storage already did."""


def unit_decoder_rows(sae: TopKSAE, source: str = "the SAE", refuse: bool = True) -> TopKSAE:
    """`sae` with unit-norm decoder rows and the same function, for training to continue from.

    Training renormalises the decoder rows after every step (SPEC section 1), so an SAE whose rows
    are not unit norm (e.g. a SAELens TopK SAE saved without rescaling) would silently become
    another SAE at the first step, whatever the learning rate. Folding row i's norm n_i into the
    encoder (W_enc[i] and b_enc[i] times n_i, W_dec[i] divided by it) keeps every reconstruction
    but multiplies latent i's pre-activation by n_i, so TopK's choice is kept only when all norms
    are equal or when every latent is kept (k = d_sae): then the folded SAE is returned. Otherwise
    no unit-norm SAE computes the same function, and with `refuse` this raises SAEFormatError
    (one line, naming `source`); without it `sae` comes back unchanged (fine for evaluation,
    which never renormalises).
    """
    norms = torch.linalg.vector_norm(sae.W_dec.detach().double(), dim=1)
    if (norms - 1).abs().max() <= UNIT_NORM_TOLERANCE or not sae.selector.unit_norm_decoder:
        return sae
    low, high = norms.min().item(), norms.max().item()
    # Folding rescales the pre-activations, which only TopK's choice is known to survive (a
    # selector's threshold, say, would have to be rescaled with them).
    if low > 0 and isinstance(sae.selector, TopK) and (high / low - 1 <= UNIT_NORM_TOLERANCE or sae.k == sae.d_sae):
        scale = norms if sae.k == sae.d_sae else norms.mean().expand_as(norms)
        scale = scale.to(sae.W_dec.dtype)
        return sae_from_tensors(sae.W_enc * scale[:, None], sae.b_enc * scale, sae.W_dec / scale[:, None], sae.b_dec, sae.k)
    if not refuse:
        return sae
    raise SAEFormatError(
        f"{source}: decoder row norms range from {low:.4g} to {high:.4g}; training keeps them at 1, and rescaling "
        f"them would change which latents {sae.selector.class_name()} selects, so this SAE cannot be fine-tuned without changing it "
        "(it can still be evaluated with `lightning-sae validate`)"
    )


# ---- shared helpers -----------------------------------------------------------------------------------


def sae_from_tensors(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, selector: Selector | None = None) -> TopKSAE:
    """A float32 TopKSAE holding these tensors (W_enc in nn.Linear orientation [d_sae, d_in]),
    selecting with `selector` (default TopK) as it is, state included."""
    if W_enc.ndim != 2:
        raise SAEFormatError(f"W_enc must be 2-d [d_sae, d_in], got shape {list(W_enc.shape)}")
    d_sae, d_in = W_enc.shape
    expected = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)), "b_dec": (b_dec, (d_in,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise SAEFormatError(
                f"{name} has shape {list(tensor.shape)}, but W_enc {list(W_enc.shape)} implies {list(shape)}"
            )
    # Built on the meta device and then handed the tensors, so a large SAE is not first
    # randomly initialised and held twice.
    with torch.device("meta"):
        sae = TopKSAE(d_in, d_sae, k)
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    sae.load_state_dict({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}, assign=True)
    if selector is not None:
        sae.selector = selector
        selector.setup(sae)
    return sae


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _check_hookpoint(hookpoint: str) -> None:
    # A hookpoint is one directory name; dot-names are reserved for our temporary directories.
    if not hookpoint or hookpoint.startswith(".") or "/" in hookpoint or os.sep in hookpoint:
        raise ValueError(f"hookpoint must be a plain directory name (no '/', not starting with '.'), got {hookpoint!r}")


def _positive_int(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _dimensions(cfg: dict[str, Any], where: Path, d_sae_key: str) -> tuple[int, int, int]:
    d_in, d_sae, k = (_positive_int(cfg, key, where) for key in ("d_in", d_sae_key, "k"))
    if k > d_sae:
        raise SAEFormatError(f"{where}: k={k} exceeds {d_sae_key}={d_sae}")
    return d_in, d_sae, k


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as file:
            cfg = json.load(file)
    except FileNotFoundError:
        raise SAEFormatError(f"missing {path}") from None
    except json.JSONDecodeError as error:
        raise SAEFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path} must hold a JSON object")
    return cfg


def _read_safetensors(
    path: Path, expected: dict[str, tuple[int, ...]], shapes_from: str, allow_extra: bool = False
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors named in `expected`, after checking names and shapes from the header alone;
    with `allow_extra`, any others too (their reader checks them)."""
    if not path.is_file():
        raise SAEFormatError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            names = set(file.keys())
            if not set(expected) <= names or (names != set(expected) and not allow_extra):
                raise SAEFormatError(
                    f"{path} holds tensors {sorted(names)}, expected {sorted(expected)}"
                    f" (missing {sorted(set(expected) - names)}, unexpected {sorted(names - set(expected))})"
                )
            for name, shape in expected.items():
                actual = tuple(file.get_slice(name).get_shape())
                if actual != shape:
                    raise SAEFormatError(f"{path}: {name} has shape {list(actual)}, but {shapes_from} implies {list(shape)}")
            tensors = {name: file.get_tensor(name) for name in (names if allow_extra else expected)}
            header = file.metadata() or {}
    except SafetensorError as error:
        # The header records every tensor's byte range, so truncation shows up here.
        raise SAEFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise SAEFormatError(f"{path}: {name} has dtype {tensor.dtype}, expected a floating-point dtype")
    check_finite(tensors, path)
    return tensors, header


def check_finite(tensors: dict[str, Tensor], source: object) -> None:
    """One pass over weights just read (small next to reading them): NaN/inf weights would make
    every reconstruction NaN, or spoil training from its first step."""
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise SAEFormatError(f"{source}: {name} holds NaN/inf in {bad} of {tensor.numel()} values; the file is damaged")


def _write_safetensors(path: Path, tensors: dict[str, Tensor], dtype: str, header: dict[str, str] | None = None) -> None:
    cast = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt", **(header or {})})


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


@contextmanager
def _sae_directory(target: Path) -> Iterator[Path]:
    """An empty directory to write an SAE into, which then replaces `target` whole (atomic_directory
    flushes its files); refuses a `target` that is not an SAE directory."""
    if target.exists() and not _replaceable(target):
        raise FileExistsError(f"{target} exists and does not look like an SAE directory; refusing to replace it")
    with atomic_directory(target) as directory:
        yield directory


def write_sae_directory(
    target: Path, weights_file: str, tensors: dict[str, Tensor], cfg: dict[str, Any], dtype: str, header: dict[str, str] | None = None
) -> None:
    """Replace `target` whole by an SAE directory: `weights_file` (safetensors, cast to `dtype`,
    with `header` metadata) and cfg.json. SAELens's and sparsify's layouts are both this shape."""
    with _sae_directory(target) as tmp:
        _write_safetensors(tmp / weights_file, tensors, dtype, header)
        _write_json(tmp / CFG_FILE, cfg)


def _replaceable(target: Path) -> bool:
    """Only an empty directory or a previous SAE (it has a cfg.json) may be replaced: a mistyped
    path must not delete someone's unrelated directory."""
    return target.is_dir() and (not any(target.iterdir()) or (target / CFG_FILE).is_file())


# ---- building blocks for plugins' own formats (e.g. lightning-sae-transcoder's) -------------------
read_json = _read_json
read_safetensors = _read_safetensors
check_dtype = _check_dtype
check_hookpoint = _check_hookpoint
