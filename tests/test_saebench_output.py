"""`--eval_output`: SAEBench's core result file from `lightning-sae validate` and at the end of a fit.

The layout is checked against SAEBench's `CoreEvalOutput` schema (its field names and types,
written out below as pydantic models, since SAEBench itself is not installed), read the way
SAEBench's graphing utilities read it, and its numbers must be those validation logged. Also:
the held-out evaluation set is never part of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM

from eval_helpers import D_SAE, LAYER, TinySetup, build
from lightning_sae.cli import main as cli_main
from lightning_sae.data import ActivationDataModule
from lightning_sae.data.cache import ShardReader, read_manifest
from lightning_sae.evaluation import CORE_GROUPS, core_eval_paths
from lightning_sae.module import SAEModule

SPLICED_CONTEXTS = 8


# ---- SAEBench's CoreEvalOutput schema (sae_bench/evals/core/eval_output.py), field by field ----
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelBehaviorPreservation(Strict):
    kl_div_score: float
    kl_div_with_ablation: float
    kl_div_with_sae: float


class ModelPerformancePreservation(Strict):
    ce_loss_score: float
    ce_loss_with_ablation: float
    ce_loss_with_sae: float
    ce_loss_without_sae: float


class ReconstructionQuality(Strict):
    explained_variance: float
    explained_variance_legacy: float  # in SAEBench's and SAELens's current output, not yet in its schema file
    mse: float
    cossim: float


class Shrinkage(Strict):
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float


class Sparsity(Strict):
    l0: float
    l1: float


class TokenStats(Strict):
    total_tokens_eval_reconstruction: int
    total_tokens_eval_sparsity_variance: int


class Misc(Strict):
    freq_over_1_percent: float
    freq_over_10_percent: float
    normalized_freq_over_1_percent: float
    normalized_freq_over_10_percent: float
    average_max_encoder_cosine_sim: float
    average_max_decoder_cosine_sim: float
    frac_alive: float


class Categories(Strict):
    model_behavior_preservation: ModelBehaviorPreservation
    model_performance_preservation: ModelPerformancePreservation
    reconstruction_quality: ReconstructionQuality
    shrinkage: Shrinkage
    sparsity: Sparsity
    token_stats: TokenStats
    misc_metrics: Misc


class FeatureMetric(Strict):
    index: int
    feature_density: float
    consistent_activation_heuristic: float
    encoder_bias: float
    encoder_norm: float
    encoder_decoder_cosine_sim: float
    max_decoder_cosine_sim: float
    max_encoder_cosine_sim: float


class EvalConfig(Strict):
    model_name: str
    llm_dtype: str
    batch_size_prompts: int
    n_eval_reconstruction_batches: int
    n_eval_sparsity_variance_batches: int
    dataset: str
    context_size: int
    compute_kl: bool
    compute_ce_loss: bool
    compute_l2_norms: bool
    compute_sparsity_metrics: bool
    compute_variance_metrics: bool
    compute_featurewise_density_statistics: bool
    compute_featurewise_weight_based_metrics: bool
    exclude_special_tokens_from_reconstruction: bool
    verbose: bool


class CoreEvalOutput(Strict):
    eval_type_id: str
    eval_config: EvalConfig
    eval_id: str
    datetime_epoch_millis: int
    eval_result_metrics: Categories
    eval_result_details: list[FeatureMetric]
    sae_bench_commit_hash: str
    sae_lens_id: str | None
    sae_lens_release_id: str | None
    sae_lens_version: str | None
    sae_cfg_dict: dict | None
    eval_result_unstructured: dict | None


def load_strict(path: Path) -> dict:
    """The file as JSON that any reader accepts: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def saebench_graphing_view(path: Path) -> dict:
    """What SAEBench's graphing_utils.get_eval_results / get_core_results take from a core file."""
    data = load_strict(path)
    flat = {name: value for group in data["eval_result_metrics"].values() for name, value in group.items()}
    key = path.name.replace("_eval_results.json", "")
    return {"key": key, **flat, "sae_class": data["sae_cfg_dict"]["architecture"], "d_sae": data["sae_cfg_dict"]["d_sae"],
            "l0": data["eval_result_metrics"]["sparsity"]["l0"],
            "ce_loss_score": data["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build(tmp_path_factory.mktemp("saebench"))


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_validate_writes_saebench_core_json_with_the_logged_numbers(tiny, tmp_path):
    out = tmp_path / "core" / "tiny_sae_eval_results.json"
    cli = cli_main(["validate", "--model=sae", f"--model.init_from={tiny.sae_dir}", f"--model.spliced_eval_contexts={SPLICED_CONTEXTS}",
                    f"--eval_output={out}", *tiny.data_args(), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false"])
    logged = {name.removeprefix("val/"): float(value) for name, value in cli.trainer.callback_metrics.items()}
    data = load_strict(out)
    parsed = CoreEvalOutput.model_validate(data)
    assert parsed.eval_type_id == "core"
    assert {group: tuple(values) for group, values in data["eval_result_metrics"].items()} == CORE_GROUPS
    for group, values in data["eval_result_metrics"].items():
        for name, value in values.items():
            if group != "token_stats":
                assert value == pytest.approx(logged[name], rel=1e-6, abs=1e-7), name
    # Every held-out row and every scored position counted.
    dm = cli.datamodule
    rows = read_manifest(tiny.cache_dir)["rows"]["val"]
    contexts = dm.validation_contexts(SPLICED_CONTEXTS)
    tokens = data["eval_result_metrics"]["token_stats"]
    assert tokens["total_tokens_eval_sparsity_variance"] == rows
    assert tokens["total_tokens_eval_reconstruction"] == int((contexts != dm.tokenizer.bos_token_id).sum())
    assert parsed.eval_config.compute_kl and parsed.eval_config.context_size == dm.context_size
    details = data["eval_result_details"]
    assert [d["index"] for d in details] == list(range(D_SAE))
    density = torch.tensor([d["feature_density"] for d in details])
    assert (density > 0).double().mean().item() == pytest.approx(logged["frac_alive"])
    assert density.mean().item() * D_SAE == pytest.approx(logged["l0"], rel=1e-5)  # each token fires l0 latents
    assert all(d["consistent_activation_heuristic"] == -1 for d in details)  # not computed, SAEBench's NaN
    assert "consistent_activation_heuristic" in data["eval_result_unstructured"]["not_computed_written_as_-1"]
    view = saebench_graphing_view(out)
    assert view["key"] == "tiny_sae" and view["sae_class"] == "topk" and view["d_sae"] == D_SAE
    assert view["ce_loss_score"] == pytest.approx(logged["ce_loss_score"], rel=1e-6)


def test_fit_writes_the_last_validation_and_marks_what_it_could_not_compute(tmp_path):
    out = tmp_path / "results.json"
    data = ["--data=lightning_sae.tensor_data.TensorDataModule", "--data.synthetic.num_tokens=1200", "--data.synthetic.d_in=16",
            "--data.synthetic.num_features=32", "--data.batch_size=256", "--data.validation_fraction=0.25"]
    cli = cli_main(["fit", "--model=sae", "--model.k=4", "--model.d_sae=32", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", f"--eval_output={out}", *data])
    written = load_strict(out)
    CoreEvalOutput.model_validate(written)
    final = {name.removeprefix("val/"): float(v) for name, v in cli.trainer.callback_metrics.items() if name.startswith("val/")}
    for name in ("explained_variance", "l0", "l2_ratio", "average_max_decoder_cosine_sim"):
        group = next(g for g, names in CORE_GROUPS.items() if name in names)
        assert written["eval_result_metrics"][group][name] == pytest.approx(final[name], rel=1e-6), name
    assert not written["eval_config"]["compute_kl"]
    assert set(written["eval_result_metrics"]["model_behavior_preservation"].values()) == {-1}
    assert "ce_loss_score" in written["eval_result_unstructured"]["not_computed_written_as_-1"]
    assert written["eval_result_unstructured"]["other_metrics"]["fvu"] == pytest.approx(final["fvu"], rel=1e-6)


def test_several_results_go_beside_the_given_path():
    paths = core_eval_paths("out/run_eval_results.json", ["val/", "val/plain_topk/"])
    assert paths == {"val/": Path("out/run_eval_results.json"), "val/plain_topk/": Path("out/run_plain_topk_eval_results.json")}
    paths = core_eval_paths("r.json", ["val/layers.3/", "val/layers.9/sae_in/"])
    assert paths == {"val/layers.3/": Path("r_layers.3.json"), "val/layers.9/sae_in/": Path("r_layers.9_sae_in.json")}


class RowSpy(L.Callback):
    """Every training and validation batch's rows, as the module received them."""

    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.train.append(batch["x"].detach().clone())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val.append(batch["x"].detach().clone())


def test_the_evaluation_set_is_held_out(tiny, tmp_path):
    """Validation rows are the held-out contexts' activations (recomputed here independently),
    the spliced evaluation reads only held-out contexts, and training reads only training rows
    of training contexts, which share no context with the held-out ones."""
    dm = ActivationDataModule(**tiny.datamodule_kwargs())
    spliced_contexts: list[torch.Tensor] = []
    original = dm.validation_contexts
    dm.validation_contexts = lambda n: spliced_contexts.append(original(n)) or spliced_contexts[-1]
    spy = RowSpy()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy], num_sanity_val_steps=0)
    trainer.fit(SAEModule(k=4, d_sae=64, spliced_eval_contexts=SPLICED_CONTEXTS), dm)

    manifest = read_manifest(tiny.cache_dir)
    held_out = original(10**6)
    training_contexts = ShardReader(tiny.cache_dir, manifest, "train", ["x"]).contexts(10**6)
    assert not {tuple(c) for c in held_out.tolist()} & {tuple(c) for c in training_contexts.tolist()}
    assert spliced_contexts and all(
        {tuple(c) for c in used.tolist()} <= {tuple(c) for c in held_out.tolist()} for used in spliced_contexts
    )
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()
    with torch.no_grad():
        hidden = model(input_ids=held_out, output_hidden_states=True).hidden_states[LAYER + 1]
    expected = hidden[held_out != dm.tokenizer.bos_token_id]
    torch.testing.assert_close(torch.cat(spy.val), expected, rtol=1e-4, atol=1e-4)
    train_rows = ShardReader(tiny.cache_dir, manifest, "train", ["x"])(torch.arange(manifest["rows"]["train"]))["x"]
    known = {row.float().numpy().tobytes() for row in train_rows}
    seen = torch.cat(spy.train).float()
    assert len(seen) == 6 * dm.batch_size and all(row.numpy().tobytes() in known for row in seen)
