"""Per-layer transcoders against a cross-layer transcoder on the same model (docs/circuits.md).

From a fit of transcoders on every layer (configs/transcoders_all_layers.yaml) and a CLT fit
(--model=clt) on the same data, on held-out contexts of the embedded corpus (contexts
--skip.. of it; the fits used its first ones):

- per layer, the explained variance of the MLP output (clean activations; each transcoder's own
  rule, and the calibrated JumpReLU the circuit-tracer export runs, with its L0);
- the replacement model's CE, KL and ce_loss_score with every MLP replaced at once
  (lightning_sae_clt.replacement_scores), for both;
- training throughput, interleaved in one process on batches of the fits' size: one optimizer
  step of the 30-transcoder module, of a one-transcoder module, and of the CLT; the model's
  forward per batch to the end and stopped after layer l (what a streamed single-layer fit of
  layer l pays). The all-layers fit pays one full forward per batch; 30 independent
  single-layer fits pay sum_l forward(<= l) and 30 one-transcoder steps.

    python tools/circuits_measure.py --transcoders runs/tc/.../last.ckpt --clt runs/clt/.../last.ckpt --out circuits.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_sae.data.hooks import ActivationRecorder, StopForward
from lightning_sae.data.models import model_location
from lightning_sae.data.text import dataset_texts, pack_contexts
from lightning_sae.metrics import fraction_of_variance_unexplained


def module_from_checkpoint(path: str):
    from lightning_sae.circuit_tracer import module_from_checkpoint as load

    return load(path).eval()


@torch.no_grad()
def held_out(model, tokenizer, n_layers: int, skip: int, count: int, context_size: int):
    contexts = torch.stack(list(itertools.islice(pack_contexts(dataset_texts("python-docs"), tokenizer, context_size), skip, skip + count)))
    kinds = [f"layers.{layer}.{kind}" for layer in range(n_layers) for kind in ("mlp_in", "mlp_out")]
    xs, ys = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
    for row in contexts.split(4):
        with ActivationRecorder(model, None, kinds) as recorder:
            model(input_ids=row, use_cache=False)
        keep = row != tokenizer.bos_token_id
        for layer in range(n_layers):
            xs[layer].append(recorder.values[f"layers.{layer}.mlp_in"][keep].float())
            ys[layer].append(recorder.values[f"layers.{layer}.mlp_out"][keep].float())
    return contexts, [torch.cat(x) for x in xs], [torch.cat(y) for y in ys]


def explained(y, yhat) -> float:
    return 1.0 - float(fraction_of_variance_unexplained(y.double(), yhat.double()))


@torch.no_grad()
def per_layer_quality(tc_module, clt_module, xs, ys, tc_thresholds, clt_thresholds):
    """Per layer: EV and L0 of each rule as trained, and of the calibrated JumpReLU exported."""
    rows = []
    clt = clt_module.clt
    clt_out = clt(xs)
    clt_jump = []
    for layer, x in enumerate(xs):
        pre = clt.layers[layer].pre_activations(x)
        clt_jump.append(pre * (pre > clt_thresholds[layer]))
    clt_jump_y = [clt.b_dec[m] + sum(clt_jump[s] @ clt.layers[s].decoder()[:, m - s] for s in range(m + 1)) for m in range(len(xs))]
    for layer, (x, y) in enumerate(zip(xs, ys)):
        sae = tc_module.get_sae(f"layers.{layer}/sae")
        out = sae(x)
        pre = sae.pre_activations(x)
        jump = pre * (pre > tc_thresholds[layer])
        tc_jump_y = jump @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if sae.W_skip is not None else 0)
        rows.append({
            "layer": layer,
            "transcoder_ev": explained(y, out.xhat), "transcoder_l0": float(out.code.active_per_token().mean()),
            "transcoder_jumprelu_ev": explained(y, tc_jump_y), "transcoder_jumprelu_l0": float((jump > 0).sum(1).float().mean()),
            "clt_ev": explained(y, clt_out.yhats[layer]), "clt_l0": float(clt_out.codes[layer].active_per_token().mean()),
            "clt_jumprelu_ev": explained(y, clt_jump_y[layer]), "clt_jumprelu_l0": float((clt_jump[layer] > 0).sum(1).float().mean()),
        })
    return rows


def replacement(tc_module, clt_module, model, contexts, n_layers, bos):
    from lightning_sae_clt.replacement import CLTReplacement, replacement_scores

    saes = [tc_module.get_sae(f"layers.{layer}/sae") for layer in range(n_layers)]

    def per_layer(position, rows):
        sae = saes[position]
        return sae.decode(sae.encode(rows), rows)

    layers = list(range(n_layers))
    return {"transcoders": replacement_scores(model, contexts, layers, per_layer, bos_token_id=bos),
            "clt": replacement_scores(model, contexts, layers, CLTReplacement(clt_module.clt), bos_token_id=bos)}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model, contexts, tc_module, clt_module, n_layers: int, batch_tokens: int, repeats: int) -> dict:
    """Seconds per batch of `batch_tokens` rows, measured interleaved (see the module docstring)."""
    from lightning_sae_clt import CLTModule
    from lightning_sae_transcoder import TranscoderModule

    generator = torch.Generator().manual_seed(0)
    width = tc_module.get_sae("layers.0/sae").d_in
    d_sae, k = tc_module.get_sae("layers.0/sae").d_sae, tc_module.get_sae("layers.0/sae").k
    sites = [f"layers.{layer}" for layer in range(n_layers)]
    batch = {f"{site}/{key}": torch.randn(batch_tokens, width, generator=generator) for site in sites for key in ("x", "y")}
    one = {"x": batch["layers.0/x"], "y": batch["layers.0/y"]}

    def stepper(module, data):
        optimizer = module.optimizer_and_schedule(1000)["optimizer"]
        module.b_dec_initialized.fill_(True)

        def step():
            optimizer.zero_grad(set_to_none=True)
            module.training_step(data, 0).backward()
            optimizer.step()

        return step

    def quiet(module):
        module.log = lambda *a, **k: None
        module.log_dict = lambda *a, **k: None
        return module.train()

    all_tc = quiet(TranscoderModule(k=k, d_sae=d_sae, widths={key: width for key in batch}, sites=sites, lr=1e-3))
    one_tc = quiet(TranscoderModule(k=k, d_sae=d_sae, widths={"x": width, "y": width}, lr=1e-3))
    clt = quiet(CLTModule(k=k, d_sae=d_sae, widths={key: width for key in batch}, sites=sites, lr=1e-3))
    steps = {"all_transcoders_step": (stepper(all_tc, batch)), "one_transcoder_step": stepper(one_tc, one), "clt_step": stepper(clt, batch)}
    tokens = contexts[: max(1, batch_tokens // contexts.shape[1])]

    def forward_to(layer: int | None):
        def run():
            with torch.no_grad():
                if layer is None:
                    model(input_ids=tokens, use_cache=False)
                    return
                try:
                    with ActivationRecorder(model, None, [f"layers.{layer}.mlp_out"], stop=True):
                        model(input_ids=tokens, use_cache=False)
                except StopForward:
                    pass

        return run

    probes = [0, n_layers // 2, n_layers - 1]
    results = {name: [] for name in steps}
    results.update({"forward_full": [], **{f"forward_to_{layer}": [] for layer in probes}})
    for _ in range(repeats):  # interleaved rounds: the machine's load hits every measurement alike
        for name, fn in steps.items():
            results[name].append(_time(fn, 1))
        results["forward_full"].append(_time(forward_to(None), 1))
        for layer in probes:
            results[f"forward_to_{layer}"].append(_time(forward_to(layer), 1))
    seconds = {name: statistics.median(values) for name, values in results.items()}
    scale = batch_tokens / (tokens.numel())  # forwards ran on whole contexts
    forward = {layer: seconds[f"forward_to_{layer}"] * scale for layer in probes}
    # forward(<= l) is linear in l between the probes (each layer costs the same)
    slope = (forward[probes[-1]] - forward[probes[0]]) / (probes[-1] - probes[0])
    sum_forwards = sum(forward[probes[0]] + slope * (layer - probes[0]) for layer in range(n_layers))
    full = seconds["forward_full"] * scale
    all_layers_fit = full + seconds["all_transcoders_step"]
    independent = sum_forwards + n_layers * seconds["one_transcoder_step"]
    clt_fit = full + seconds["clt_step"]
    return {
        "batch_tokens": batch_tokens, "seconds_per_batch": seconds, "forward_per_batch": {"full": full, **forward},
        "tokens_per_second": {"all_layers_fit_streamed": batch_tokens / all_layers_fit,
                              "independent_single_layer_fits_streamed": batch_tokens / independent,
                              "clt_fit_streamed": batch_tokens / clt_fit,
                              "all_layers_training_only": batch_tokens / seconds["all_transcoders_step"],
                              "independent_training_only": batch_tokens / (n_layers * seconds["one_transcoder_step"]),
                              "clt_training_only": batch_tokens / seconds["clt_step"]},
        "speedup_all_layers_vs_independent_streamed": independent / all_layers_fit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transcoders", required=True, help="checkpoint of the all-layers transcoder fit")
    parser.add_argument("--clt", required=True, help="checkpoint of the CLT fit")
    parser.add_argument("--transcoders-export", help="its circuit_tracer folder (for the calibrated thresholds)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip", type=int, default=100, help="held-out contexts start here in the corpus")
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    location = model_location(args.model)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    n_layers = model.config.num_hidden_layers
    tc_module, clt_module = module_from_checkpoint(args.transcoders), module_from_checkpoint(args.clt)
    contexts, xs, ys = held_out(model, tokenizer, n_layers, args.skip, args.contexts, args.context_size)
    note = "transcoder thresholds: the export's (calibrated on the fit's validation rows)"
    if args.transcoders_export:
        from lightning_sae.circuit_tracer import read_config

        tc_thresholds = read_config(args.transcoders_export)["lightning_sae"]["calibrated_thresholds"]
    else:
        from lightning_sae_transcoder.circuit_tracer import calibrated_thresholds

        batches = [{f"layers.{i}/x": x for i, x in enumerate(xs)}]
        tc_thresholds = calibrated_thresholds(tc_module, [f"layers.{i}/sae" for i in range(n_layers)], batches)
        note = "transcoder thresholds calibrated on the held-out rows themselves"
    clt_thresholds = clt_module.clt.calibrated_threshold.tolist()
    result = {"note": note, "held_out_contexts": args.contexts, "held_out_rows": int(xs[0].shape[0]), "context_size": args.context_size}
    start = time.perf_counter()
    result["per_layer"] = per_layer_quality(tc_module, clt_module, xs, ys, tc_thresholds, clt_thresholds)
    result["replacement"] = replacement(tc_module, clt_module, model, contexts, n_layers, tokenizer.bos_token_id)
    result["quality_seconds"] = time.perf_counter() - start
    result["parameters"] = {"transcoders": sum(p.numel() for p in tc_module.parameters()), "clt": sum(p.numel() for p in clt_module.parameters())}
    args.out.write_text(json.dumps(result, indent=1) + "\n")  # the quality numbers, before the slower timing
    result["throughput"] = throughput(model, contexts, tc_module, clt_module, n_layers, args.batch_tokens, args.repeats)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["per_layer"]:
        print(f"layer {row['layer']:2d}: EV transcoder {row['transcoder_ev']:.3f} (JumpReLU export {row['transcoder_jumprelu_ev']:.3f}, "
              f"L0 {row['transcoder_jumprelu_l0']:.1f}) | CLT {row['clt_ev']:.3f} (JumpReLU export {row['clt_jumprelu_ev']:.3f}, "
              f"L0 {row['clt_jumprelu_l0']:.1f})")
    for name, scores in result["replacement"].items():
        print(f"{name}: ce_loss_score {scores['ce_loss_score']:.3f}, CE clean {scores['ce_loss_without_sae']:.3f} replaced "
              f"{scores['ce_loss_with_sae']:.3f} zero-ablated {scores['ce_loss_with_ablation']:.3f}, kl_div_score {scores['kl_div_score']:.3f}")
    print(json.dumps(result["throughput"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
