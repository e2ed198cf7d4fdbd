"""The two analyses of SPEC section 3 on a trained pair, at the true MLP inputs x.

(a) On the line: does the Jacobian predict what happens when an input latent changes? Each active
    input latent a loses `step` units of its decoder direction (x -> x - step d_a); the MLP and the
    output encoder are rerun and the change of each active output latent b is
    delta[b, a] = (f_b(x - step d_a) - f_b(x)) / step. To first order delta = -J[b, a], so
    |J + delta| < 0.1 counts as agreeing (the paper's criterion, at step = 1).
(b) Linearity: one input latent's value is swept over 100 points from 0 to twice its activation
    (x(t) = x + (t - z_a) d_a) and an output latent's response is classified as linear,
    JumpReLU-like (zero on one side of a point, linear on the other) or other.

The output latents are the output SAE's relu pre-activations at the latents it selected at x
(no reselection), which is what J differentiates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sae.sae import SparseCode, TopKSAE
from lightning_sae_jsae.jacobian import active_jacobian
from lightning_sae_jsae.mlp import FrozenMLP

CLASSES = ("linear", "jumprelu", "other")


def _selected_outputs(sae_out: TopKSAE, y: Tensor, out_indices: Tensor) -> Tensor:
    """relu(W_enc[b] . (y - b_dec) + b_enc[b]) for outputs y [n, ..., D] of token n and its
    selected latents out_indices [n, k_out] -> [n, ..., k_out]."""
    rows = sae_out.W_enc[out_indices]  # [n, k_out, D]
    pre = torch.einsum("n...d,nbd->n...b", y - sae_out.b_dec, rows)
    bias = sae_out.b_enc[out_indices].view(out_indices.shape[0], *([1] * (y.ndim - 2)), -1)
    return torch.relu(pre + bias)


@torch.no_grad()
def encode_pair(mlp: FrozenMLP, sae_in: TopKSAE, sae_out: TopKSAE, x: Tensor) -> tuple[SparseCode, SparseCode, Tensor]:
    """Both SAEs' codes at x (the output SAE on MLP(x)) and the Jacobian block J [N, k_out, k_in]."""
    code_in = sae_in.encode(x)
    code_out = sae_out.encode(mlp(x))
    J = active_jacobian(mlp, x, sae_in.W_dec, code_in.indices, sae_out.W_enc, code_out.indices, code_out.values > 0)
    return code_in, code_out, J


@dataclass
class OnTheLine:
    J: Tensor  # [N, k_out, k_in]
    delta: Tensor  # [N, k_out, k_in] change per unit of input latent (see module docstring)

    def agreement(self, tolerance: float = 0.1) -> float:
        return float(((self.J + self.delta).abs() < tolerance).double().mean())

    def table(self, edges: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0, float("inf")), tolerance: float = 0.1) -> list[tuple[str, int, float]]:
        """(|J| bin, entries, fraction agreeing) per bin of |J|."""
        magnitude, agree = self.J.abs().flatten(), ((self.J + self.delta).abs() < tolerance).flatten()
        rows = []
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (magnitude >= low) & (magnitude < high)
            count = int(inside.sum())
            rows.append((f"[{low:g}, {high:g})", count, float(agree[inside].double().mean()) if count else float("nan")))
        return rows


@torch.no_grad()
def on_the_line(mlp: FrozenMLP, sae_in: TopKSAE, sae_out: TopKSAE, x: Tensor, step: float = 1.0, chunk_tokens: int = 64) -> OnTheLine:
    code_in, code_out, J = encode_pair(mlp, sae_in, sae_out, x)
    deltas = []
    for start in range(0, x.shape[0], chunk_tokens):
        end = min(x.shape[0], start + chunk_tokens)
        I_in, I_out = code_in.indices[start:end], code_out.indices[start:end]
        base = _selected_outputs(sae_out, mlp(x[start:end]), I_out)  # [n, k_out]
        moved = x[start:end].unsqueeze(1) - step * sae_in.W_dec[I_in]  # [n, k_in, D]
        after = _selected_outputs(sae_out, mlp(moved), I_out)  # [n, k_in, k_out]
        deltas.append(((after - base.unsqueeze(1)) / step).transpose(1, 2))
    return OnTheLine(J, torch.cat(deltas))


def _linear_error(t: Tensor, r: Tensor) -> Tensor:
    """Largest absolute residual of the least-squares line through (t, r)."""
    design = torch.stack([torch.ones_like(t), t], dim=1)
    solution = torch.linalg.lstsq(design, r.unsqueeze(1)).solution
    return (design @ solution).squeeze(1).sub(r).abs().max()


def classify_response(t: Tensor, r: Tensor, tolerance: float = 0.05, min_points: int = 3) -> str:
    """"linear", "jumprelu" or "other" for a response r(t) sampled at increasing t.

    Linear: the best line misses no point by more than `tolerance` times the response's range.
    JumpReLU-like: exactly zero (a relu's dead side) on a run of points at one end and linear, by
    the same test, on the rest, each side holding at least `min_points` points.
    """
    t, r = t.double(), r.double()
    span = float(r.max() - r.min())
    if span <= 1e-12 * max(1.0, float(r.abs().max())):
        return "linear"  # constant
    if float(_linear_error(t, r)) <= tolerance * span:
        return "linear"
    alive = (r.abs() > 1e-12 * max(1.0, float(r.abs().max()))).nonzero().flatten()
    first, last = int(alive[0]), int(alive[-1])
    for dead, live in (((slice(0, first)), slice(first, None)), (slice(last + 1, None), slice(0, last + 1))):
        live_t, live_r = t[live], r[live]
        if r[dead].numel() >= min_points and live_r.numel() >= min_points and float(_linear_error(live_t, live_r)) <= tolerance * span:
            return "jumprelu"
    return "other"


@dataclass
class LinearitySweep:
    pairs: Tensor  # [P, 3] (token, output slot b, input slot a)
    jacobian: Tensor  # [P] J[b, a] at the true x
    values: Tensor  # [P, points] swept input-latent values
    responses: Tensor  # [P, points] output-latent values
    classes: list[str]

    def fractions(self) -> dict[str, float]:
        total = max(1, len(self.classes))
        return {name: self.classes.count(name) / total for name in CLASSES}


@torch.no_grad()
def linearity_sweep(
    mlp: FrozenMLP,
    sae_in: TopKSAE,
    sae_out: TopKSAE,
    x: Tensor,
    points: int = 100,
    max_pairs: int = 1000,
    min_abs_jacobian: float = 0.01,
    tolerance: float = 0.05,
    seed: int = 0,
    chunk_pairs: int = 64,
) -> LinearitySweep:
    """Sweeps (token, input latent, output latent) pairs whose |J| exceeds `min_abs_jacobian`
    and whose input latent is active (a random sample of at most `max_pairs`)."""
    code_in, code_out, J = encode_pair(mlp, sae_in, sae_out, x)
    candidates = ((J.abs() > min_abs_jacobian) & (code_in.values > 0).unsqueeze(1)).nonzero()
    generator = torch.Generator().manual_seed(seed)
    pairs = candidates[torch.randperm(candidates.shape[0], generator=generator)[:max_pairs]]
    n, b, a = pairs.unbind(1)
    current = code_in.values[n, a]  # [P]
    fractions = torch.linspace(0, 2, points, dtype=x.dtype, device=x.device)
    values = current.unsqueeze(1) * fractions  # [P, points]
    responses = []
    for start in range(0, pairs.shape[0], chunk_pairs):
        part = slice(start, start + chunk_pairs)
        direction = sae_in.W_dec[code_in.indices[n[part], a[part]]]  # [p, D]
        moved = x[n[part]].unsqueeze(1) + (values[part] - current[part].unsqueeze(1)).unsqueeze(-1) * direction.unsqueeze(1)
        latent = code_out.indices[n[part], b[part]].unsqueeze(1)  # [p, 1]: one output latent per pair
        responses.append(_selected_outputs(sae_out, mlp(moved), latent).squeeze(-1))
    responses = torch.cat(responses) if responses else values.new_zeros(0, points)
    classes = [classify_response(v, r, tolerance) for v, r in zip(values, responses)]
    return LinearitySweep(pairs, J[n, b, a], values, responses, classes)


# ---- inputs for the command-line tools ------------------------------------------------------------
def load_pair(directory: str) -> tuple[FrozenMLP, TopKSAE, TopKSAE]:
    """A pair exported by JSAEModule.save_saes: <dir>/sae_in, <dir>/sae_out, <dir>/mlp.safetensors."""
    from pathlib import Path

    from lightning_sae.formats import load_sae

    root = Path(directory)
    sae_in, _ = load_sae(root / "sae_in")
    sae_out, _ = load_sae(root / "sae_out")
    return FrozenMLP.load(root / "mlp.safetensors"), sae_in, sae_out


def load_mlp_inputs(source: str, tokens: int) -> Tensor:
    """The first `tokens` MLP inputs x: key "x" of a safetensors file, or the validation split of
    an ActivationDataModule cache directory (whose role "x" must be mlp_in, as JSAE's is)."""
    from pathlib import Path

    path = Path(source)
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))["x"][:tokens].float()
    from lightning_sae.data import read_cache

    cache = read_cache(path) if (path / "manifest.json").is_file() else None
    if cache is None or not str(cache.settings["roles"].get("x", "")).endswith(".mlp_in"):
        raise ValueError(f"{source} is neither a safetensors file nor an activation cache whose 'x' is an mlp_in")
    if not cache.complete:
        raise ValueError(f"{source} is an unfinished activation cache; finish it with a fit first")
    damaged = cache.verify("header")  # checked like a fit's read
    if damaged:
        raise ValueError(f"{source} has damaged shards: " + "; ".join(f"{name}: {why}" for name, why in damaged.items()))
    return cache.reader("val", ["x"])(torch.arange(min(tokens, cache.rows["val"])))["x"]
