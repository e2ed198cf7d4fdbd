"""The frozen transformer MLP between the two SAEs, as plain tensors.

One representation covers plain and gated MLPs:

    plain   y = W_out act(W_in x + b_in) + b_out                  W_in: [d_mlp, D]
    gated   y = W_out (act(g) * v) + b_out,  [g; v] = W_in x + b_in  W_in: [2 d_mlp, D] (gate rows, then up rows)

so that the input side of the Jacobian is always one product with W_in. The weights are buffers
(saved in checkpoints, moved with the module, never in the optimizer) and are copied out of the
language model, so the model itself need not be kept for training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715


def _gelu_erf(u: Tensor) -> tuple[Tensor, Tensor]:
    cdf = 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    return u * cdf, cdf + u * pdf


def _gelu_tanh(u: Tensor) -> tuple[Tensor, Tensor]:
    # GPT-2's gelu_new: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
    t = torch.tanh(_SQRT_2_OVER_PI * (u + _TANH_CUBIC * u.pow(3)))
    slope = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * u * u)
    return 0.5 * u * (1.0 + t), slope


def _silu(u: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(u)
    return u * s, s * (1.0 + u * (1.0 - s))


def _relu(u: Tensor) -> tuple[Tensor, Tensor]:
    return torch.relu(u), (u > 0).to(u.dtype)


# activation name (as transformers configs spell it) -> u -> (act(u), act'(u))
ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "silu": _silu,
    "swish": _silu,
    "relu": _relu,
}


def parse_family(family: str) -> tuple[str, bool]:
    """"swiglu" -> ("silu", gated); "gated_<act>" -> (<act>, gated); "<act>" -> (<act>, plain)."""
    if family == "swiglu":
        activation, gated = "silu", True
    elif family.startswith("gated_"):
        activation, gated = family[len("gated_") :], True
    else:
        activation, gated = family, False
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported MLP activation '{activation}' (family '{family}'); supported: {sorted(ACTIVATIONS)}")
    return activation, gated


class FrozenMLP(nn.Module):
    """A transformer MLP with frozen weights and the per-token slopes its Jacobian needs.

    Args:
        W_in: [d_mlp, D], or [2 d_mlp, D] for a gated MLP (gate rows first, then up rows).
        W_out: [D_out, d_mlp].
        b_in, b_out: biases (zeros when None, as in Llama).
        family: "gelu" (GPT-NeoX/Pythia), "gelu_new" (GPT-2), "swiglu" (Llama), "gated_<act>", "<act>".
    """

    def __init__(self, W_in: Tensor, W_out: Tensor, b_in: Tensor | None = None, b_out: Tensor | None = None, family: str = "gelu"):
        super().__init__()
        self.activation, self.gated = parse_family(family)
        self.family = family
        d_mlp = W_out.shape[1]
        if W_in.ndim != 2 or W_out.ndim != 2 or W_in.shape[0] != d_mlp * (2 if self.gated else 1):
            kind = "gated (2 d_mlp rows)" if self.gated else "plain (d_mlp rows)"
            raise ValueError(f"W_in {tuple(W_in.shape)} does not fit W_out {tuple(W_out.shape)} for a {kind} MLP")
        self.register_buffer("W_in", W_in.detach().clone())
        self.register_buffer("W_out", W_out.detach().clone())
        self.register_buffer("b_in", b_in.detach().clone() if b_in is not None else W_in.new_zeros(W_in.shape[0]))
        self.register_buffer("b_out", b_out.detach().clone() if b_out is not None else W_out.new_zeros(W_out.shape[0]))

    @property
    def d_in(self) -> int:
        return self.W_in.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_out.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[1]

    def _act(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return ACTIVATIONS[self.activation](u)

    def forward(self, x: Tensor) -> Tensor:
        u = x @ self.W_in.T.to(x.dtype) + self.b_in.to(x.dtype)
        if self.gated:
            gate, up = u.chunk(2, dim=-1)
            hidden = self._act(gate)[0] * up
        else:
            hidden = self._act(u)[0]
        return hidden @ self.W_out.T.to(x.dtype) + self.b_out.to(x.dtype)

    @torch.no_grad()
    def slopes(self, x: Tensor, product_dtype: torch.dtype | None = None) -> Tensor:
        """c [N, rows of W_in] with d hidden = fold(c * (W_in dx)) at x: the local linearisation.

        plain: c = act'(u).  gated: c = [act'(g) * v ; act(g)], since d(act(g) v) = act'(g) v dg + act(g) dv.
        product_dtype: dtype of the W_in x product (e.g. bf16, where it is cheaper); the activation
        and its derivative are evaluated in x's dtype either way.
        """
        dtype = product_dtype or x.dtype
        u = (x.to(dtype) @ self.W_in.T.to(dtype)).to(x.dtype) + self.b_in.to(x.dtype)
        if not self.gated:
            return self._act(u)[1]
        gate, up = u.chunk(2, dim=-1)
        value, slope = self._act(gate)
        return torch.cat([slope * up, value], dim=-1)

    def fold(self, t: Tensor) -> Tensor:
        """[..., rows of W_in] -> [..., d_mlp]: sums the gate and up halves of a gated MLP."""
        if not self.gated:
            return t
        gate, up = t.chunk(2, dim=-1)
        return gate + up

    def unfold(self, t: Tensor) -> Tensor:
        """The adjoint of `fold`: [..., d_mlp] -> [..., rows of W_in]."""
        return torch.cat([t, t], dim=-1) if self.gated else t

    # ---- persistence --------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, str]:
        return {"family": self.family}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.family = state["family"]
        self.activation, self.gated = parse_family(self.family)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], family: str, prefix: str = "", source: str = "the state") -> "FrozenMLP":
        names = [prefix + name for name in ("W_in", "W_out", "b_in", "b_out")]
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"{source} lacks the MLP tensors {missing}; write it with FrozenMLP.save")
        return cls(*(state[name] for name in names), family)

    def save(self, path: str | Path) -> None:
        """A safetensors file of the four weights; the family is in the file's metadata."""
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in ("W_in", "W_out", "b_in", "b_out")}
        save_file(tensors, str(path), metadata={"family": self.family})

    @classmethod
    def load(cls, path: str | Path) -> "FrozenMLP":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            family = (handle.metadata() or {}).get("family")
        if family is None:
            raise ValueError(f"{path} has no 'family' in its metadata; write it with FrozenMLP.save")
        return cls.from_state_dict(load_file(str(path)), family, source=str(path))

    # ---- from a transformers model ----------------------------------------------------------
    @classmethod
    def from_module(cls, mlp: nn.Module, family: str) -> "FrozenMLP":
        """Copies the weights of an MLP module of any layout lightning_sae.data.families knows:
        gate/up/down (Llama, Gemma, Qwen, Mistral, OLMo 2), fused gate_up/down (Phi-3), or two
        plain projections (GPT-NeoX, GPT-2, ...). `family` says how it computes (mlp_family)."""
        from lightning_sae.data.families import mlp_projections

        return cls._from_projections(mlp, *mlp_projections(mlp), family)

    @classmethod
    def _from_projections(cls, mlp: nn.Module, kind: str, names: tuple[str, ...], family: str) -> "FrozenMLP":
        from lightning_sae.data.families import GATED, GATED_FUSED

        if (kind in (GATED, GATED_FUSED)) != parse_family(family)[1]:
            raise ValueError(f"{type(mlp).__name__} is a {kind} MLP, but family '{family}' says otherwise")
        weights, biases = zip(*(_weight_and_bias(getattr(mlp, name)) for name in names))
        if kind == GATED:  # gate rows first, then up rows, as one input projection
            has_bias = biases[0] is not None or biases[1] is not None
            b_in = torch.cat([_or_zeros(biases[0], weights[0]), _or_zeros(biases[1], weights[1])]) if has_bias else None
            return cls(torch.cat(weights[:2]), weights[2], b_in, biases[2], family)
        # A fused gate_up projection's outputs are already [gate; up], like W_in's rows.
        return cls(weights[0], weights[1], biases[0], biases[1], family)


def _weight_and_bias(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [out, in], bias or None) of an nn.Linear, or of GPT-2's Conv1D, which stores [in, out]."""
    weight = linear.weight.detach().float()
    if type(linear).__name__ == "Conv1D":
        weight = weight.T
    bias = getattr(linear, "bias", None)
    return weight, None if bias is None else bias.detach().float()


def _or_zeros(bias: Tensor | None, weight: Tensor) -> Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


def mlp_from_model(model: nn.Module, layer: int) -> FrozenMLP:
    """Layer `layer`'s MLP of a transformers causal LM as a FrozenMLP, for every family in
    lightning_sae.data.families (and models outside it whose MLP has a known layout)."""
    from lightning_sae.data.families import mlp_layout
    from lightning_sae.data.hooks import mlp_module

    layout = mlp_layout(model, layer)
    return FrozenMLP._from_projections(mlp_module(model, layer), layout.kind, layout.projections, layout.family)
