"""tools/saebench_local.py (issue 31, item 3): SAEBench's own absorption and meta_structure evals
on an SAE saved here, with a tiny local Llama whose vocabulary is whole alphabetic words (so
SAEBench's first-letter task has words to build prompts from). Skipped without sae-bench.

The adapter's HookedTransformer must compute the HF model's activations at the SAE's hook and
its logits; the evals must write SAEBench's own result files for our SAE."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_bench", reason="sae-bench is not installed (pip install --no-deps sae-bench==0.6.0; see tools/saebench_local.py)")
pytest.importorskip("sklearn", reason="SAEBench's absorption eval needs scikit-learn (pip install -e '.[saebench]')")

from lightning_sae.formats import save_saelens  # noqa: E402
from lightning_sae.sae import TopKSAE  # noqa: E402

TOOLS = Path(__file__).resolve().parents[1] / "tools"
D_IN, D_SAE, K = 32, 64, 4


def load_tool():
    spec = importlib.util.spec_from_file_location("saebench_local", TOOLS / "saebench_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("saebench")
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(400)})
    text = [" ".join(words[i : i + 20]) + " has the first letter: " + " ".join(w.upper() for w in words[i : i + 3])
            for i in range(0, len(words), 20)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=D_IN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    sae = TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K, seed=0)
    sae_dir = root / "sae"
    save_saelens(sae, sae_dir, metadata={"model_name": str(model_dir), "hook_name": "blocks.1.hook_resid_post", "context_size": 32,
                                         "prepend_bos": True, "dataset_path": "none"})
    return {"root": root, "model_dir": model_dir, "sae_dir": sae_dir, "tool": load_tool()}


def test_the_adapter_computes_the_hf_models_activations(tiny):
    from transformers import AutoModelForCausalLM

    model = tiny["tool"].hooked_transformer_from_folder(tiny["model_dir"])  # raises if its logits differ
    reference = AutoModelForCausalLM.from_pretrained(tiny["model_dir"])
    ids = torch.randint(3, reference.config.vocab_size, (2, 9))
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states[2]  # layer 1's output
        logits = reference(ids).logits
        tl_logits, cache = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tl_logits, logits, rtol=1e-4, atol=1e-4)


def test_saebenchs_own_evals_run_on_our_sae(tiny):
    out = tiny["root"] / "results"
    status = tiny["tool"].main([
        "--sae", str(tiny["sae_dir"]), "--out", str(out),
        "--meta-structure", json.dumps({"train_steps": 30, "train_batch_size": 32}),
        "--absorption", json.dumps({"k_sparse_probe_num_epochs": 2, "max_k_value": 2, "min_feats_for_eval": 1,
                                    "min_GT_probe_f1": 0.0, "llm_batch_size": 16}),
    ])
    assert status == 0
    meta = json.loads(next((out / "meta_structure").glob("*.json")).read_text())
    assert meta["eval_type_id"] == "meta_structure_decoder_variance" and meta["sae_cfg_dict"]["d_sae"] == D_SAE
    explained = meta["eval_result_metrics"]["meta_structure"]["decoder_fraction_variance_explained"]
    assert -1.0 < explained <= 1.0
    absorption = json.loads(next((out / "absorption").glob("*.json")).read_text())
    assert absorption["eval_type_id"] == "absorption_first_letter"
    mean = absorption["eval_result_metrics"]["mean"]
    assert 0.0 <= mean["mean_absorption_fraction_score"] <= 1.0 and 0.0 <= mean["mean_full_absorption_score"] <= 1.0
    assert absorption["eval_result_details"], "no letter was evaluated"
    # SAEBench keeps the trained probe in its package folder, under this model's own name
    from sae_bench.evals.absorption.common import PROBES_DIR

    assert (PROBES_DIR / tiny["tool"].probe_cache_name(tiny["model_dir"]) / "layer_1" / "probe.pth").is_file()


def test_two_models_never_share_saebenchs_probe_cache(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    tool = tiny["tool"]
    name = tool.probe_cache_name(tiny["model_dir"])
    assert name.startswith("model-") and name == tool.probe_cache_name(tiny["model_dir"])  # stable
    other = tmp_path / "model"  # the same folder name, other weights
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaForCausalLM.config_class.from_pretrained(tiny["model_dir"])).save_pretrained(other)
    for path in tiny["model_dir"].iterdir():
        if not (other / path.name).exists():
            (other / path.name).write_bytes(path.read_bytes())  # the tokenizer files
    assert tool.probe_cache_name(other) != name
    assert tool.hooked_transformer_from_folder(tiny["model_dir"]).cfg.model_name == name


def test_absorption_runs_the_model_only_up_to_the_saes_hook(tiny):
    """Absorption reads only the cached activations at the SAE's hook (run_with_cache(...)[1]), so
    running the blocks up to it (the default) caches exactly what running every block caches. The
    whole eval cannot be compared run against run: SAEBench's absorption draws its vocabulary
    split and in-context examples from Python's unseeded `random` (two runs in one process differ)."""
    model = tiny["tool"].hooked_transformer_from_folder(tiny["model_dir"])
    ids = torch.randint(3, model.cfg.d_vocab, (2, 9))
    with torch.no_grad():
        _, whole = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
        calls = []
        with tiny["tool"].stop_after_hook(model, "blocks.1.hook_resid_post"):
            original = model.blocks[2].forward
            model.blocks[2].forward = lambda *a, **k: calls.append(1) or original(*a, **k)
            _, stopped = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
            del model.blocks[2].forward
    assert not calls, "the block after the hook ran"
    assert torch.equal(whole["blocks.1.hook_resid_post"], stopped["blocks.1.hook_resid_post"])
    assert "run_with_cache" not in vars(model)  # the wrapper is gone afterwards
