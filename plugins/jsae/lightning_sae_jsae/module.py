"""JSAEModule: two TopK SAEs around a frozen MLP, trained to make the MLP's computation sparse
in their latents (SPEC section 3).

    loss = rec(x, xhat) + c_out * rec(y, yhat) + lambda_t * mean |J|

x is the MLP input, y = MLP(x) its output (both from the data), J the k x k Jacobian of
encoder_out o MLP o decoder_in on the active latents with the MLP's slopes taken at the true x.
lambda_t rises linearly from 0 over the first `jacobian_warmup_fraction` of the steps.

Validation reports the Jacobian at two points, under names that say which:

    val/jacobian_at_x/...     training's: slopes at the true x, output latents those of y = MLP(x)
    val/jacobian_at_xhat/...  the pair as it runs: x -> input latents -> xhat = decoder_in(...) ->
                              MLP(xhat) -> output latents selected on MLP(xhat); slopes at xhat.
                              The Jacobian of the function the trained pair computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_sae.data.hooks import hookpoint_layer
from lightning_sae.data_request import DataRequest, Hook, HookKind
from lightning_sae.module import SAEStep, SAETrainingModule
from lightning_sae.sae import SparseCode
from lightning_sae_jsae.jacobian import active_jacobian, active_jacobian_l1
from lightning_sae_jsae.metrics import DEFAULT_THRESHOLDS, JacobianStats
from lightning_sae_jsae.mlp import FrozenMLP, mlp_from_model

_HISTOGRAM_VALUES = 1 << 20  # |J| entries kept per validation epoch for the TensorBoard histogram


class JSAEModule(SAETrainingModule):
    """A Jacobian-sparse SAE pair: `sae_in` on the MLP input (batch key "x", hook mlp_in) and
    `sae_out` on the MLP output (key "y", hook mlp_out) of one layer.

    Args:
        k: latents active per token, in each SAE.
        d_sae: latents per SAE; None gives expansion_factor * width.
        expansion_factor: d_sae / width when d_sae is None.
        jacobian_coefficient: lambda, the weight of mean |J| (paper: 1 for Pythia-70m, 0.5 for
            Pythia-410m, roughly 0.5 k^2 / d_model). 0 trains the two SAEs independently.
        jacobian_warmup_fraction: lambda rises linearly from 0 over this fraction of all steps.
        output_coefficient: c_out, the weight of the output SAE's reconstruction loss.
        reconstruction_loss: "mse" (SPEC: mean over elements of (x - xhat)^2) or "fvu" (the base
            recipe's normalized MSE). Either way AuxK is added with the base's coefficient; under
            "mse" it is scaled by the batch's per-element variance, so that its ratio to the main
            loss is the base recipe's (MSE = FVU * variance).
        mlp: the frozen MLP; None reads it from `mlp_weights` or, in a fit, from the DataModule's
            language model (`load_language_model()` and `layer`, as ActivationDataModule has).
        mlp_weights: a safetensors file written by FrozenMLP.save (e.g. by a previous run's export).
        jacobian_chunk_tokens: tokens per batched matmul of the Jacobian (bounds its memory).
        jacobian_precision: products of the training penalty: "exact" (the weights' dtype),
            "bf16" (bf16 operands, fp32 sums) or "auto" (default: bf16 for fp32 weights where bf16
            matmuls are fast, i.e. AVX512-BF16 / AMX CPUs and GPUs; exact elsewhere). Validation's
            Jacobian and its counts are always exact. See docs/jsae.md for the measured effect.
        jacobian_thresholds: |J| levels whose per-token counts are reported.
        example_jacobians: k x k |J| images (of the pair's own Jacobian, at xhat) written to
            TensorBoard each validation.
        **kwargs: SAETrainingModule's (lr, warmup_steps, dead_tokens, aux_k, seed, ...).
    """

    hparams_ignore = ("mlp",)
    supports_activation_normalization = True  # the frozen MLP is rescaled with the SAEs (current_mlp)

    def __init__(
        self,
        k: int = 32,
        d_sae: int | None = None,
        expansion_factor: int = 16,
        jacobian_coefficient: float = 1.0,
        jacobian_warmup_fraction: float = 0.05,
        output_coefficient: float = 1.0,
        reconstruction_loss: str = "mse",
        mlp: FrozenMLP | None = None,
        mlp_weights: str | None = None,
        jacobian_chunk_tokens: int = 16,
        jacobian_precision: str = "auto",
        jacobian_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
        example_jacobians: int = 4,
        **kwargs: Any,
    ):
        if jacobian_precision not in ("auto", "exact", "bf16"):
            raise ValueError(f"jacobian_precision must be 'auto', 'exact' or 'bf16', got {jacobian_precision!r}")
        if reconstruction_loss not in ("mse", "fvu"):
            raise ValueError(f"reconstruction_loss must be 'mse' or 'fvu', got {reconstruction_loss!r}")
        if jacobian_coefficient < 0 or output_coefficient < 0:
            raise ValueError("jacobian_coefficient and output_coefficient must be >= 0")
        if not 0 <= jacobian_warmup_fraction <= 1:
            raise ValueError(f"jacobian_warmup_fraction must be in [0, 1], got {jacobian_warmup_fraction}")
        super().__init__(**kwargs)
        self.mlp: FrozenMLP | None = None
        if mlp is None and mlp_weights is not None:
            mlp = FrozenMLP.load(mlp_weights)
        if mlp is not None:
            self.mlp = mlp.requires_grad_(False)
        self.val_jacobian = torch.nn.ModuleDict(
            {where: JacobianStats(tuple(jacobian_thresholds)) for where in ("at_x", "at_xhat")}
        )
        self._total_steps: int | None = None
        self._histogram_values: dict[str, list[Tensor]] = {}  # per site
        self._example_jacobians: dict[str, Tensor] = {}

    # ---- one pair per site -------------------------------------------------------------------------
    # With one site the MLP and the Jacobian statistics are `mlp` and `val_jacobian`, as ever; with
    # several, each site has its own in `site_mlps` / `site_val_jacobian` (keyed like its SAEs).
    def _build(self, widths: dict[str, int], sites: list[str] | None = None) -> None:
        super()._build(widths, sites)
        if len(self.scopes) > 1:
            thresholds = tuple(self.hparams.jacobian_thresholds)
            self.site_mlps = torch.nn.ModuleDict()
            self.site_val_jacobian = torch.nn.ModuleDict({
                self._attribute(scope): torch.nn.ModuleDict({w: JacobianStats(thresholds) for w in ("at_x", "at_xhat")})
                for scope in self.scopes
            })

    def raw_mlp(self) -> FrozenMLP | None:
        """The frozen MLP of the site being run, on the model's own activations."""
        if not self._scope:
            return self.mlp
        return self.site_mlps[self._attribute(self._scope)] if self._attribute(self._scope) in self.site_mlps else None

    def current_mlp(self) -> FrozenMLP | None:
        """The frozen MLP of the site being run, in the units the SAEs train in: with activation
        normalisation (x scaled by s_x, y by s_y) it is u -> s_y MLP(u / s_x), i.e. W_in / s_x,
        s_y W_out and s_y b_out, so the penalty and its Jacobian are those of the normalised pair."""
        mlp = self.raw_mlp()
        if mlp is None or not self.normalizes_activations:
            return mlp
        s_x = self.activation_scale(self._scoped(self._scope, "x"))
        s_y = self.activation_scale(self._scoped(self._scope, "y"))
        key = (id(mlp), s_x, s_y, mlp.W_in.device)
        cached = self.__dict__.setdefault("_normalized_mlps", {})
        if key not in cached:
            cached[key] = FrozenMLP(mlp.W_in / s_x, mlp.W_out * s_y, mlp.b_in, mlp.b_out * s_y, family=mlp.family).requires_grad_(False)
        return cached[key]

    def _current_stats(self) -> torch.nn.ModuleDict:
        return self.val_jacobian if not self._scope else self.site_val_jacobian[self._attribute(self._scope)]

    # ---- the variant's contract ----------------------------------------------------------------
    def sae_shapes(self, widths: dict[str, int]) -> dict[str, tuple[str, int, int]]:
        shapes = {}
        for name, key in (("sae_in", "x"), ("sae_out", "y")):
            d_sae = self.hparams.d_sae or self.hparams.expansion_factor * widths[key]
            if not 1 <= self.hparams.k <= d_sae:
                raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={self.hparams.k}")
            shapes[name] = (key, d_sae, self.hparams.k)
        return shapes

    def data_request(self) -> DataRequest:
        # Both hooks of the same layer, read in one model pass; the MLP between them is read from
        # the model's modules before any pass, so an MLP we cannot differentiate fails at once.
        reads = {"x": Hook.kind(HookKind.MLP_IN), "y": Hook.kind(HookKind.MLP_OUT)}
        return DataRequest(reads, check_model=_check_mlp_readable)

    # ---- the frozen MLP ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if len(self.scopes) > 1 and self.mlp is not None:
            raise ValueError("mlp / mlp_weights give one MLP, but the data has several hook points: "
                             "each site's MLP is read from the language model")
        # load_from_checkpoint calls this without a trainer; on_load_checkpoint then restores the MLP.
        for scope in self.scopes:
            with self.site_scope(scope):
                if self.current_mlp() is None and self._trainer is not None:
                    mlp = self._mlp_from_datamodule()
                    if scope:
                        self.site_mlps[self._attribute(scope)] = mlp
                    else:
                        self.mlp = mlp
                if self.current_mlp() is not None:
                    self._check_mlp_fits()

    def _mlp_from_datamodule(self) -> FrozenMLP:
        datamodule = getattr(self.trainer, "datamodule", None)
        hookpoints = (getattr(datamodule, "metadata", None) or {}).get("hookpoints") or {}
        layer = hookpoint_layer(hookpoints.get(self._scoped(self._scope, "x"), ""))
        if not hasattr(datamodule, "load_language_model") or layer is None:
            raise RuntimeError(
                "JSAE needs the frozen MLP between its SAEs: give model.mlp_weights (a safetensors file "
                "written by FrozenMLP.save) or use a DataModule with a language model (ActivationDataModule)"
            )
        with torch.inference_mode(False):
            model = datamodule.load_language_model()
        return mlp_from_model(model, layer).to(self.device).requires_grad_(False)

    def _check_mlp_fits(self) -> None:
        mlp = self.current_mlp()
        widths = {"x": self.get_sae("sae_in").d_in, "y": self.get_sae("sae_out").d_in}
        if (mlp.d_in, mlp.d_out) != (widths["x"], widths["y"]):
            raise ValueError(f"the MLP maps {mlp.d_in} -> {mlp.d_out}, but the data has x width {widths['x']} and y width {widths['y']}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # load_from_checkpoint builds the SAEs from the saved widths but has no DataModule to take
        # the MLP from; the checkpoint holds it.
        state = checkpoint.get("state_dict", {})
        if self.mlp is None and "mlp.W_in" in state:
            family = state.get("mlp._extra_state", {}).get("family")
            self.mlp = FrozenMLP.from_state_dict(state, family, prefix="mlp.")
        for key in state:
            if key.startswith("site_mlps.") and key.endswith(".W_in"):
                site = key[len("site_mlps.") : -len(".W_in")]
                if site not in self.site_mlps:
                    family = state.get(f"site_mlps.{site}._extra_state", {}).get("family")
                    self.site_mlps[site] = FrozenMLP.from_state_dict(state, family, prefix=f"site_mlps.{site}.")

    # ---- training --------------------------------------------------------------------------------
    def jacobian_coefficient_now(self) -> float:
        """lambda_t: linear warm-up from 0 over the first `jacobian_warmup_fraction` of the steps."""
        lam = float(self.hparams.jacobian_coefficient)
        if lam == 0.0 or self.hparams.jacobian_warmup_fraction == 0:
            return lam  # no warm-up: the run length (which needs a Trainer) is not needed
        if self._total_steps is None:
            self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self._total_steps * self.hparams.jacobian_warmup_fraction)
        return lam if warmup == 0 else lam * min(1.0, self.global_step / warmup)

    def _jacobian_arguments(self, x: Tensor, code_in: SparseCode, code_out: SparseCode) -> dict[str, Any]:
        return dict(
            mlp=self.current_mlp(),
            x=x,
            W_dec_in=self.get_sae("sae_in").W_dec,
            in_indices=code_in.indices,
            W_enc_out=self.get_sae("sae_out").W_enc,
            out_indices=code_out.indices,
            out_active=code_out.values.detach() > 0,
            chunk_tokens=self.hparams.jacobian_chunk_tokens,
        )

    def jacobian(self, x: Tensor, code_in: SparseCode, code_out: SparseCode) -> Tensor:
        """J [N, k, k] at the true MLP input x, for the given active latents of both SAEs."""
        return active_jacobian(**self._jacobian_arguments(x, code_in, code_out))

    def jacobian_at_xhat(self, xhat: Tensor, code_in: SparseCode) -> tuple[Tensor, SparseCode]:
        """J [N, k, k] of the pair as it runs, at its own latents: the MLP linearised at the
        reconstruction xhat = decoder_in(code_in), the output latents chosen by encoder_out on
        MLP(xhat). Returns J and those output latents."""
        _, code_out, _ = self.encode_decode("sae_out", self.current_mlp()(xhat))
        return self.jacobian(xhat, code_in, code_out), code_out

    def jacobian_l1(self, x: Tensor, code_in: SparseCode, code_out: SparseCode) -> Tensor:
        """mean |J| (the penalty), without materialising J's autograd graph."""
        return active_jacobian_l1(**self._jacobian_arguments(x, code_in, code_out), precision=self.hparams.jacobian_precision)

    def reconstruction_loss(self, step: SAEStep, x: Tensor) -> Tensor:
        if self.hparams.reconstruction_loss == "fvu":
            return step.loss
        variance = (x.float() - x.float().mean(0)).pow(2).mean().detach()
        return variance * step.loss  # = MSE + aux_coefficient * variance * AuxK

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["x"], batch["y"]
        step_in, step_out = self.sae_step("sae_in", x), self.sae_step("sae_out", y)
        loss = self.reconstruction_loss(step_in, x) + self.hparams.output_coefficient * self.reconstruction_loss(step_out, y)
        lam = self.jacobian_coefficient_now()
        values = {"train/jacobian_coefficient": lam}
        # At lambda_t = 0 (the baseline, and the first warm-up step) the Jacobian is skipped:
        # it would contribute nothing, and the baseline's step time must not include it.
        if lam > 0:
            jacobian_l1 = self.jacobian_l1(x, step_in.code, step_out.code)
            loss = loss + lam * jacobian_l1
            values["train/jacobian_l1"] = jacobian_l1.detach()
        values["train/loss"] = loss.detach()
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log_sae_training("sae_in", step_in, prefix="train/sae_in/")
        self.log_sae_training("sae_out", step_out, prefix="train/sae_out/")
        return loss

    # ---- validation ---------------------------------------------------------------------------------
    def validate_batch(self, batch: dict[str, Tensor]) -> None:
        x, y = batch["x"], batch["y"]
        xhat, code_in, _ = self.encode_decode("sae_in", x)
        yhat, code_out, _ = self.encode_decode("sae_out", y)
        self.update_validation("sae_in", "", x, xhat, code_in)
        self.update_validation("sae_out", "", y, yhat, code_out)
        stats = self._current_stats()
        stats["at_x"].update(self.jacobian(x, code_in, code_out))
        J, _ = self.jacobian_at_xhat(xhat.detach(), code_in)
        stats["at_xhat"].update(J)
        histogram = self._histogram_values.setdefault(self._scope, [])
        kept = sum(values.numel() for values in histogram)
        if kept < _HISTOGRAM_VALUES:
            histogram.append(J.abs().flatten()[: _HISTOGRAM_VALUES - kept].cpu())
        if self._scope not in self._example_jacobians:
            self._example_jacobians[self._scope] = J[: self.hparams.example_jacobians].abs().cpu()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for scope in self.scopes:
            with self.site_scope(scope):
                for where, stats in self._current_stats().items():
                    # jacobian_l1 -> val/jacobian_at_x/l1 (val/<site>/jacobian_at_x/l1 with several sites)
                    values = stats.compute()
                    prefix = f"val/jacobian_{where}/"
                    self.log_dict({prefix + name.removeprefix("jacobian_"): v.float() for name, v in values.items()}, sync_dist=False)
                    stats.reset()
                self._log_jacobian_pictures()
        self._histogram_values, self._example_jacobians = {}, {}

    def _log_jacobian_pictures(self) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or not self.trainer.is_global_zero:
            return
        writer = self.logger.experiment
        histogram = self._histogram_values.get(self._scope)
        tag = self.scoped_metric("val/jacobian_at_xhat")
        if histogram:
            writer.add_histogram(f"{tag}/abs", torch.cat(histogram), self.global_step)
        if self._scope in self._example_jacobians:
            for i, block in enumerate(self._example_jacobians[self._scope]):
                # Each image is scaled to its own largest entry (white); upsampled so 32 x 32 is visible.
                image = (block / block.max().clamp_min(1e-12)).repeat_interleave(4, 0).repeat_interleave(4, 1)
                writer.add_image(f"{tag}/example_{i}", image, self.global_step, dataformats="HW")

    # ---- export -------------------------------------------------------------------------------------
    def save_saes(self, directory: str | Path) -> dict[str, Path]:
        """Each SAE as a SAELens directory (`sae_in/`, `sae_out/`), and the frozen MLP beside
        them as `mlp.safetensors` (not part of either SAE) for the analysis tools."""
        written = super().save_saes(directory)
        for scope in self.scopes:
            with self.site_scope(scope):
                mlp = self.raw_mlp()  # the exported SAEs take raw activations too
            if mlp is not None:
                target = Path(directory) / scope
                target.mkdir(parents=True, exist_ok=True)
                mlp.save(target / "mlp.safetensors")
        return written


def _check_mlp_readable(model: torch.nn.Module, roles: dict[str, str]) -> None:
    """Reads the MLP between each pair's hook points (on weightless modules: nothing is computed)."""
    for key, hookpoint in roles.items():
        if key.rsplit("/", 1)[-1] != "x":
            continue
        if hookpoint_layer(hookpoint) is None:
            raise ValueError(f"a JSAE pair needs its input inside a decoder layer, got {hookpoint!r}")
        mlp_from_model(model, hookpoint_layer(hookpoint))
