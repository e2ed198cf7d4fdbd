"""SAEBench's own absorption and meta_structure evals on an SAE saved by lightning-sae, offline,
on the local model the SAE was trained on.

    python tools/saebench_local.py --sae runs/quickstart/lightning_logs/version_0/sae --out saebench_results

It runs the real `sae-bench` package's code (sae_bench.evals.absorption.main.run_eval and
sae_bench.evals.meta_structure.main.run_eval); what is ours is only the adapter that hands it
what it expects without the network:

- the model: SAEBench's model-based evals call `HookedTransformer.from_pretrained_no_processing`
  with a TransformerLens model name, which a local HF folder (the embedded SmolLM2 or any saved
  Llama-family model) is not. The adapter builds the HookedTransformer from the folder's own
  config and weights (TransformerLens's converters, no weight processing) and checks its logits
  against the HF model's before use;
- the SAE: loaded with `sae_lens.SAE.load_from_disk` (our saved cfg.json names the
  TransformerLens hook, e.g. blocks.15.hook_resid_post).

absorption builds its first-letter task from the model's vocabulary (no dataset download);
meta_structure trains a BatchTopK SAE on W_dec alone. Install (sae-bench's declared requirements
pull torchvision and with it a CUDA torch, which these two evals never import):

    pip install --no-deps sae-bench==0.6.0
    pip install -c <torch constraint> -e ".[saebench]"     # scikit-learn, tabulate

Results: SAEBench's own JSON files (one per eval) under --out, and a summary line per eval.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

EVALS = ("absorption", "meta_structure")


def hooked_transformer_from_folder(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, check: bool = True):
    """A TransformerLens HookedTransformer of a local HF causal-LM folder, weights unprocessed
    (SAEBench's `from_pretrained_no_processing`), its logits checked against the HF model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = loading.convert_hf_model_config(folder)  # reads a local folder's config.json
    config = HookedTransformerConfig(**{**config, "device": device, "dtype": dtype, "n_devices": 1})
    state_dict = loading.get_pretrained_state_dict(folder, config, hf_model, dtype=dtype)
    model = HookedTransformer(config, tokenizer, move_to_device=True)
    model.cfg.model_name = probe_cache_name(folder)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    if check:
        ids = torch.randint(3, min(config.d_vocab, tokenizer.vocab_size), (1, 12))
        with torch.no_grad():
            expected = hf_model(ids.to(hf_model.device)).logits.float().cpu()
            got = model(ids.to(device)).float().cpu()
        error = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-6))
        if error > 1e-3:
            raise RuntimeError(f"the TransformerLens model of {folder} differs from the HF model (relative logit error {error:.2e})")
    del hf_model
    return model


def probe_cache_name(folder: str | Path) -> str:
    """The model's name as SAEBench sees it: <folder name>-<fingerprint of its files>. SAEBench
    keeps absorption's trained probes in its own package folder under the model's name (and
    TransformerLens names every local folder 'custom'), so without this two models, or two tiny
    test models, would share one another's probes."""
    from lightning_sae.data import models

    return f"{Path(folder).name}-{models.model_identity(str(folder))['fingerprint'][:16]}"


@contextlib.contextmanager
def local_model(eval_module: Any, model) -> Iterator[None]:
    """Inside: `eval_module.HookedTransformer.from_pretrained_no_processing(...)` returns `model`."""
    original = eval_module.HookedTransformer

    class LocalHookedTransformer:
        @staticmethod
        def from_pretrained_no_processing(name: str, **kwargs: Any):
            return model

    eval_module.HookedTransformer = LocalHookedTransformer
    try:
        yield
    finally:
        eval_module.HookedTransformer = original


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    # absorption writes its k-sparse probing results under the current directory (its probes go
    # to SAEBench's package folder, under probe_cache_name).
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def model_folder(name: str) -> Path:
    """A local folder of the model `name` (the embedded default, a folder, or a cached hub name)."""
    from lightning_sae.data import models

    return Path(models.model_location(name))


def model_of(metadata: dict) -> str | None:
    """The model a saved SAE was trained on, as `data.model` names it: the embedded default when
    the cfg's fingerprint is that of the embedded GGUF, else its model_name."""
    from lightning_sae.data import models

    fingerprint = metadata.get("model_fingerprint")
    if fingerprint and fingerprint == models.model_identity(models.EMBEDDED_MODEL)["fingerprint"]:
        return models.EMBEDDED_MODEL
    return metadata.get("model_name")


@contextlib.contextmanager
def stop_after_hook(model, hook_name: str | None) -> Iterator[None]:
    """Inside: `model.run_with_cache` runs the blocks up to the SAE's hook only.

    absorption reads nothing but the cached activations at the SAE's hook (`run_with_cache(...)[1]`),
    and a residual stream at block L does not depend on the blocks after it, so their compute
    (14 of SmolLM2's 30 blocks at layer 15) is skipped. A hook name that is not
    `blocks.L.hook_...` leaves the model whole."""
    layer = hook_name.split(".")[1] if hook_name and hook_name.startswith("blocks.") else None
    if layer is None or not layer.isdigit():
        yield
        return
    original = model.run_with_cache

    def run_with_cache(*args: Any, **kwargs: Any):
        kwargs.setdefault("stop_at_layer", int(layer) + 1)
        return original(*args, **kwargs)

    model.run_with_cache = run_with_cache
    try:
        yield
    finally:
        del model.run_with_cache  # the instance attribute; the class's method shows again


def run_absorption(sae, model, out: Path, device: str, whole_model: bool = False, **overrides: Any) -> dict:
    from sae_bench.evals.absorption import main as absorption
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    config = AbsorptionEvalConfig(model_name=model.cfg.model_name, llm_dtype="float32", **overrides)
    (out / "absorption").mkdir(parents=True, exist_ok=True)  # its run_eval writes there without making it
    hook = None if whole_model else getattr(sae.cfg.metadata, "hook_name", None)
    with local_model(absorption, model), working_directory(out / "absorption_work"), stop_after_hook(model, hook):
        torch.manual_seed(config.random_seed)
        results = absorption.run_eval(config, [("lightning-sae", sae)], device, str(out / "absorption"), force_rerun=True)
    return results


def run_meta_structure(sae, out: Path, device: str, **overrides: Any) -> dict:
    from sae_bench.evals.meta_structure import main as meta_structure
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig

    # SAEBench's default trains the meta-SAE under bf16 autocast, which is emulated on CPUs without
    # AVX512-BF16 / AMX (on this project's AMD CPU: over 2 s a step, against 0.14 s in fp32), so
    # there it runs in fp32 unless asked otherwise; the eval's JSON records the setting.
    from lightning_sae.hardware import has_fast_bf16_matmul

    overrides.setdefault("autocast", has_fast_bf16_matmul(torch.device(device)))
    config = MetaStructureEvalConfig(**overrides)
    meta_structure._set_random_seed(config.random_seed)
    return meta_structure.run_eval(config, [("lightning-sae", sae)], device, str(out / "meta_structure"), force_rerun=True)


def load_sae(path: str, device: str, model_name: str | None = None):
    """The SAE as sae_lens loads it; SAEBench insists on a model name in its metadata, which an
    SAE saved without one (e.g. from a TensorDataModule) gets from `model_name`."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=device)
    if getattr(sae.cfg.metadata, "model_name", None) is None and model_name is not None:
        sae.cfg.metadata.model_name = model_name
    return sae


def summary(out: Path) -> dict[str, dict]:
    """{eval: its eval_result_metrics} from the JSON files SAEBench wrote under `out`."""
    found = {}
    for name in EVALS:
        for path in sorted((out / name).glob("*.json")):
            found[name] = json.loads(path.read_text())["eval_result_metrics"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, help="a SAELens directory saved by lightning-sae (<log dir>/sae)")
    parser.add_argument("--model", default=None, help="model name or folder (default: the SAE cfg's model_name)")
    parser.add_argument("--out", default="saebench_results")
    parser.add_argument("--evals", nargs="+", choices=EVALS, default=list(EVALS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--absorption", default="{}", help="JSON of AbsorptionEvalConfig overrides, e.g. '{\"k_sparse_probe_num_epochs\": 10}'")
    parser.add_argument("--whole-model", action="store_true",
                        help="absorption: run every block, not only those up to the SAE's hook (same results, slower)")
    parser.add_argument("--meta-structure", default="{}", help="JSON of MetaStructureEvalConfig overrides, e.g. '{\"train_steps\": 500}'")
    args = parser.parse_args(argv)
    try:
        import sae_bench  # noqa: F401
    except ImportError:
        print("saebench_local: error: sae-bench is not installed: pip install --no-deps sae-bench==0.6.0 "
              "and pip install -e '.[saebench]' (see this file's docstring)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    sae = load_sae(args.sae, args.device, args.model)
    if "meta_structure" in args.evals:
        run_meta_structure(sae, out, args.device, **json.loads(args.meta_structure))
    if "absorption" in args.evals:
        cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
        name = args.model or model_of(cfg.get("metadata", {}))
        if not name:
            print("saebench_local: error: the SAE's cfg.json names no model: give --model", file=sys.stderr)
            return 2
        model = hooked_transformer_from_folder(model_folder(name), args.device)
        run_absorption(sae, model, out, args.device, whole_model=args.whole_model, **json.loads(args.absorption))
    for name, metrics in summary(out).items():
        print(f"{name}: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
