"""TranscoderModule: one transcoder per site, reading an MLP's input and predicting its output.

Written against the core's public contract only: the data request says which hooks are read
(`x` at mlp_in, `y` at mlp_out of the site's layer), the SAESpec says the SAE encodes `x` and
predicts `y`, so that FVU, AuxK, the validation metrics and the spliced CE/KL (read mlp_in, write
mlp_out) are all measured against the MLP's output with no code of the variant's own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.calibration import calibrate_threshold
from lightning_sae.data_request import DataRequest, Hook, HookKind
from lightning_sae.formats import FormatCannotRunSelector
from lightning_sae.module import SAESpec, SAETrainingModule
from lightning_sae.selection import Selector
from lightning_sae_transcoder.circuit_tracer import save_circuit_tracer_set
from lightning_sae_transcoder.formats import save_saelens_transcoder, save_sparsify_transcoder, sparsify_module_name
from lightning_sae_transcoder.sae import Transcoder
from lightning_sae_transcoder.threshold import rows_of

# Training rows the SAELens export's JumpReLU threshold is calibrated on (lightning_sae_transcoder.threshold).
CALIBRATION_ROWS = 16384


class TranscoderModule(SAETrainingModule):
    """A TopK transcoder at each site: encodes the hook `input` of the site's layer and predicts
    its hook `output`.

    Args:
        k: latents active per token.
        d_sae: number of latents; None gives expansion_factor * d_in.
        expansion_factor: d_sae / d_in when d_sae is None.
        selector: which latents fire (any Selector, e.g. a plugin); None is the core's TopK.
        skip_connection: add a learned linear map of the input to the output (sparsify's
            `skip_connection`, SAELens's SkipTranscoder), starting at zero.
        normalize_decoder: keep the decoder rows at unit norm (default: free, as sparsify's
            transcoders are; the rows then carry the output's scale).
        input: hook kind the transcoder encodes (default mlp_in).
        output: hook kind it predicts and is spliced into (default mlp_out).
        **kwargs: SAETrainingModule's (lr, warmup_steps, dead_tokens, aux_k, seed, ...).
    """

    hparams_ignore = ("selector",)

    def __init__(
        self,
        k: int = 32,
        d_sae: int | None = None,
        expansion_factor: int = 16,
        selector: Selector | None = None,
        skip_connection: bool = False,
        normalize_decoder: bool = False,
        input: str = "mlp_in",
        output: str = "mlp_out",
        **kwargs: Any,
    ):
        HookKind(input), HookKind(output)  # a clear error for a misspelt kind, before anything is built
        self.set_selector(selector)  # the prototype each site's SAE copies
        super().__init__(**kwargs)

    def data_request(self) -> DataRequest:
        reads = {"x": Hook.kind(self.hparams.input), "y": Hook.kind(self.hparams.output)}
        return DataRequest(reads, gradients=self.selector.needs_gradients)

    def sae_shapes(self, widths: dict[str, int]) -> dict[str, SAESpec]:
        d_sae = self.hparams.d_sae or self.hparams.expansion_factor * widths["x"]
        if not 1 <= self.hparams.k <= d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae ({d_sae}), got k={self.hparams.k}")
        return {"sae": SAESpec("x", d_sae, self.hparams.k, target="y", selector=self.selector)}

    def build_sae(self, spec: SAESpec, widths: dict[str, int], seed: int) -> Transcoder:
        return Transcoder(
            widths[spec.input], spec.d_sae, spec.k, seed=seed, selector=copy.deepcopy(spec.selector),
            d_out=widths[spec.target_key], skip_connection=self.hparams.skip_connection,
            normalize_decoder=self.hparams.normalize_decoder,
        )

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        step = self.sae_step("sae", batch["x"], grad=batch.get("grad"), target=batch["y"])
        self.log("train/loss", step.loss, on_step=True, prog_bar=True, batch_size=batch["x"].shape[0])
        self.log_sae_training("sae", step)
        return step.loss

    def validate_batch(self, batch: dict[str, Tensor]) -> None:
        xhat, code, _ = self.encode_decode("sae", batch["x"], grad=batch.get("grad"))
        self.update_validation("sae", "", batch["y"], xhat, code)

    # ---- export: SAELens's (skip_)transcoder directory and sparsify's --transcode layout ---------
    def sae_metadata(self, name: str) -> dict[str, Any]:
        """The core's metadata (hook_name, hookpoint: where the input is read) plus where the
        output is written (hook_name_out, hookpoint_out) and the selection (k)."""
        metadata = super().sae_metadata(name)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        source = dict(getattr(datamodule, "metadata", {}) or {})
        target = self.sae_targets[name]
        if target in (source.get("hook_names") or {}):
            metadata["hook_name_out"] = source["hook_names"][target]
        if target in (source.get("hookpoints") or {}):
            metadata["hookpoint_out"] = source["hookpoints"][target]
        return metadata

    def save_saes(self, directory: str | Path) -> dict[str, Path]:
        """Every transcoder as SAELens's JumpReLU (skip) transcoder; a TopK one with its threshold
        calibrated on up to CALIBRATION_ROWS training rows. One that cannot be written so is
        skipped with one line saying why."""
        directory = Path(directory)
        written = {}
        for name in self.sae_names:
            target = directory / self.sae_directory(name)
            sae = self.get_sae(name)
            try:
                calibration = self.calibration(name) if sae.selector.saelens_export(sae).architecture == "topk" else None
                written[name] = save_saelens_transcoder(sae, target, metadata=self.sae_metadata(name), calibration=calibration)
            except FormatCannotRunSelector as error:
                rank_zero_info(f"lightning-sae: {name} not saved in SAELens format: {error}")
        if len(self.sae_names) > 1:  # a transcoder on every layer: also circuit-tracer's layout
            self._save_circuit_tracer_at_fit_end(directory.parent / "circuit_tracer")
        return written

    def calibration(self, name: str) -> dict[str, Any] | None:
        """The JumpReLU threshold at which transcoder `name` keeps k latents per training row on
        average (calibrate_threshold), on the fit's training rows; None without a DataModule."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return None
        rows = rows_of(datamodule.train_dataloader(), self.sae_inputs[name], CALIBRATION_ROWS)
        if rows.numel() == 0:
            return None
        sae = self.get_sae(name)
        was_training = sae.training
        try:
            return calibrate_threshold(sae.eval(), rows, sae.k)
        finally:
            sae.train(was_training)

    def save_circuit_tracer(self, directory: str | Path, batches=None) -> Path:
        """One transcoder per layer 0..L-1 in circuit-tracer's transcoder_set layout
        (lightning_sae_transcoder.circuit_tracer); TopK needs held-out `batches` to calibrate on."""
        return save_circuit_tracer_set(self, directory, batches)

    def _save_circuit_tracer_at_fit_end(self, target: Path) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        try:
            self.save_circuit_tracer(target, datamodule.val_dataloader() if hasattr(datamodule, "val_dataloader") else None)
        except ValueError as error:  # FormatCannotRunSelector: not one transcoder per layer, or nothing to calibrate on
            rank_zero_info(f"lightning-sae: transcoders not saved in circuit-tracer format: {error}")
            return
        rank_zero_info(f"lightning-sae: transcoders saved (circuit-tracer transcoder_set) to {target}")

    def save_saes_sparsify(self, directory: str | Path) -> dict[str, Path]:
        """sparsify's transcoders map a module's input to its output, named by the module: only a
        transcoder from mlp_in to mlp_out of one layer has such a name (`layers.N.mlp`)."""
        written = {}
        for name in self.sae_names:
            metadata = self.sae_metadata(name)
            module = sparsify_module_name(metadata.pop("hookpoint", None), metadata.pop("hookpoint_out", None))
            if module is None:
                continue
            try:
                written[name] = save_sparsify_transcoder(self.get_sae(name), directory, module, metadata)
            except FormatCannotRunSelector as error:  # e.g. a threshold at inference
                rank_zero_info(f"lightning-sae: {name} not saved in sparsify format: {error}")
        return written
