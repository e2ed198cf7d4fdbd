"""The attribution graph of one prompt, offline on CPU, through circuit-tracer (the `circuits` extra).

Loads a language model folder (default: the embedded SmolLM2-135M) and a transcoder set or
cross-layer transcoder exported for circuit-tracer (`<log dir>/circuit_tracer`, or
`lightning-sae-export CKPT DIR --format circuit-tracer`), builds the graph with circuit-tracer's
`attribute` (nnsight backend), and writes to --out:

    graph.pt       the graph as plain tensors and strings (torch.load(..., weights_only=True)):
                   adjacency_matrix [targets, sources] over [selected features, error nodes
                   (layer-major), token embeddings, logits], active_features (layer, pos, feature),
                   selected_features, activation_values, input_tokens, logit ids and probabilities
    summary.json   sizes, the logits, and the strongest paths: per layer the features with the
                   largest influence on the logits, their strongest edges, and each feature's
                   top-activating contexts from the given text
    graph.html     a self-contained view of those paths (SVG: tokens at the bottom, one row per
                   layer, logits at the top; edge width |weight|, blue positive, red negative;
                   hover a feature for its contexts)

    python tools/attribution_graph.py --transcoders runs/clt/lightning_logs/version_0/circuit_tracer \\
        --prompt "The capital of France is" --out graph_out

--activation topk runs a TopK-trained export with circuit-tracer's own TopK module (the trained
function) instead of the calibrated JumpReLU the files store.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path

import torch

from lightning_sae.circuit_tracer import (
    import_circuit_tracer,
    load_circuit_tracer,
    read_config,
)


def build_graph(model_dir: str, transcoders: Path, prompt: str, activation: str, max_feature_nodes: int, batch_size: int, max_logits: int):
    import_circuit_tracer()
    from circuit_tracer import ReplacementModel, attribute

    loaded = load_circuit_tracer(transcoders, activation=activation)
    model = ReplacementModel.from_pretrained_and_transcoders(model_dir, loaded, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)
    graph = attribute(prompt, model, max_n_logits=max_logits, desired_logit_prob=0.95, batch_size=batch_size,
                      max_feature_nodes=max_feature_nodes, verbose=False)
    return model, graph


def node_influence(graph) -> torch.Tensor:
    """Each node's total (direct and indirect) influence on the logits, weighted by their
    probabilities (circuit-tracer's own `compute_node_influence`)."""
    from circuit_tracer.graph import compute_node_influence

    n_logits = len(graph.logit_targets)
    weights = torch.zeros(graph.adjacency_matrix.shape[0])
    weights[-n_logits:] = graph.logit_probabilities.float().cpu()
    return compute_node_influence(graph.adjacency_matrix.float().cpu(), weights)


def strongest_paths(graph, tokenizer, per_layer: int, max_edges: int) -> dict:
    """The top `per_layer` features by influence in every layer, and the strongest edges among
    them, the prompt's tokens and the logits."""
    influence = node_influence(graph)
    n_features = len(graph.selected_features)
    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    token_start = n_features + n_layers * n_pos
    logit_start = token_start + n_pos
    features = graph.active_features[graph.selected_features].cpu()
    chosen: dict[int, dict] = {}
    for layer in range(n_layers):
        in_layer = (features[:, 0] == layer).nonzero().flatten()
        top = in_layer[influence[in_layer].argsort(descending=True)[:per_layer]]
        for index in top.tolist():
            _, pos, feature = features[index].tolist()
            chosen[index] = {"node": index, "kind": "feature", "layer": layer, "pos": pos, "feature": feature,
                             "activation": float(graph.activation_values[index]), "influence": float(influence[index])}
    tokens = [tokenizer.decode([t]) for t in graph.input_tokens.tolist()]
    for pos in range(n_pos):
        chosen[token_start + pos] = {"node": token_start + pos, "kind": "token", "pos": pos, "token": tokens[pos],
                                     "influence": float(influence[token_start + pos])}
    logits = []
    for offset, target in enumerate(graph.logit_targets):
        vocab = int(target.vocab_idx) if hasattr(target, "vocab_idx") else int(target[1])
        text = tokenizer.decode([vocab]) if vocab < tokenizer.vocab_size else str(target)
        probability = float(graph.logit_probabilities[offset])
        chosen[logit_start + offset] = {"node": logit_start + offset, "kind": "logit", "token": text, "probability": probability}
        logits.append({"token": text, "probability": probability})
    nodes = sorted(chosen)
    sub = graph.adjacency_matrix.float().cpu()[nodes][:, nodes]  # [targets, sources]
    order = sub.abs().flatten().argsort(descending=True)[:max_edges]
    edges = []
    for flat in order.tolist():
        target, source = divmod(flat, len(nodes))
        weight = float(sub[target, source])
        if weight != 0:
            edges.append({"source": nodes[source], "target": nodes[target], "weight": weight})
    return {"nodes": [chosen[n] for n in nodes], "edges": edges, "logits": logits, "tokens": tokens}


@torch.no_grad()
def top_contexts(model, tokenizer, texts: list[str], features: list[dict], context_tokens: int, per_feature: int) -> None:
    """Adds to each feature its `per_feature` contexts of largest activation among `texts`
    (circuit-tracer's transcoders on the clean model, as in the graph), the firing token marked."""
    best: dict[tuple[int, int], list[tuple[float, str]]] = {(f["layer"], f["feature"]): [] for f in features}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :context_tokens]
        if ids.shape[1] < 2:
            continue
        _, activations = model.get_activations(ids)  # [layers, pos, d_transcoder]
        for (layer, feature), found in best.items():
            values = activations[layer, 1:, feature]  # position 0 (BOS) is not scored
            value, pos = values.max(0)
            if value > 0:
                pos = int(pos) + 1
                pieces = [tokenizer.decode([t]) for t in ids[0, max(0, pos - 12) : pos + 4].tolist()]
                mark = min(pos, 12)
                snippet = "".join(pieces[:mark]) + "[[" + pieces[mark] + "]]" + "".join(pieces[mark + 1 :])
                found.append((float(value), snippet))
    for feature in features:
        ranked = sorted(best[(feature["layer"], feature["feature"])], key=lambda item: -item[0])[:per_feature]
        feature["top_contexts"] = [{"activation": value, "text": text} for value, text in ranked]


def render_html(paths: dict, prompt: str, n_layers: int, title: str) -> str:
    width_per_pos, height_per_layer = 130, 46
    n_pos = len(paths["tokens"])
    width, height = max(600, 80 + n_pos * width_per_pos), 140 + (n_layers + 2) * height_per_layer
    position = {}
    per_cell: dict[tuple[int, int], int] = {}
    for node in paths["nodes"]:
        if node["kind"] == "token":
            row, pos = -1, node["pos"]
        elif node["kind"] == "logit":
            row, pos = n_layers, n_pos - 1
        else:
            row, pos = node["layer"], node["pos"]
        slot = per_cell.get((row, pos), 0)
        per_cell[(row, pos)] = slot + 1
        x = 60 + pos * width_per_pos + (slot % 4) * 26 + (slot // 4) * 8
        y = height - 60 - (row + 1) * height_per_layer - (slot // 4) * 10
        position[node["node"]] = (x, y)
    largest = max((abs(e["weight"]) for e in paths["edges"]), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">']
    for layer in range(n_layers):
        y = height - 60 - (layer + 1) * height_per_layer
        parts.append(f'<text x="4" y="{y + 4}" fill="#888">L{layer}</text>')
    for edge in sorted(paths["edges"], key=lambda e: abs(e["weight"])):
        (x1, y1), (x2, y2) = position[edge["source"]], position[edge["target"]]
        colour = "#2060c0" if edge["weight"] > 0 else "#c03020"
        stroke = 0.4 + 4.0 * abs(edge["weight"]) / largest
        parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" stroke-width="{stroke:.2f}" stroke-opacity="0.55">'
                     f'<title>{edge["weight"]:+.4g}</title></line>')
    for node in paths["nodes"]:
        x, y = position[node["node"]]
        if node["kind"] == "feature":
            contexts = "\n".join(f'{c["activation"]:.3g}: {c["text"]}' for c in node.get("top_contexts", []))
            tip = f'L{node["layer"]} feature {node["feature"]} at token {node["pos"]}\nactivation {node["activation"]:.3g}, influence {node["influence"]:.3g}\n{contexts}'
            parts.append(f'<circle cx="{x}" cy="{y}" r="7" fill="#f0b030" stroke="#444"><title>{html.escape(tip)}</title></circle>')
            parts.append(f'<text x="{x - 10}" y="{y - 10}" font-size="9">{node["feature"]}</text>')
        elif node["kind"] == "token":
            parts.append(f'<rect x="{x - 8}" y="{y - 8}" width="16" height="16" fill="#90c090"><title>{html.escape(node["token"])}</title></rect>')
            parts.append(f'<text x="{x - 8}" y="{y + 24}">{html.escape(repr(node["token"]))}</text>')
        else:
            parts.append(f'<rect x="{x - 8}" y="{y - 8}" width="16" height="16" fill="#b090e0"><title>{html.escape(node["token"])} p={node["probability"]:.3f}</title></rect>')
    parts.append("</svg>")
    logits = ", ".join(f'{html.escape(repr(item["token"]))} ({item["probability"]:.3f})' for item in paths["logits"])
    rows = []
    for node in paths["nodes"]:
        if node["kind"] == "feature":
            contexts = "<br>".join(html.escape(f'{c["activation"]:.3g}: {c["text"]}') for c in node.get("top_contexts", []))
            rows.append(f'<tr><td>L{node["layer"]}</td><td>{node["feature"]}</td><td>{html.escape(repr(paths["tokens"][node["pos"]]))}</td>'
                        f'<td>{node["activation"]:.3g}</td><td>{node["influence"]:.3g}</td><td>{contexts or "(none fired)"}</td></tr>')
    table = ("<table border=1 cellspacing=0 cellpadding=3><tr><th>layer</th><th>feature</th><th>token</th><th>activation</th>"
             "<th>influence</th><th>top-activating contexts (firing token in [[ ]])</th></tr>" + "".join(rows) + "</table>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h3>{html.escape(title)}</h3><p>Prompt: <code>{html.escape(prompt)}</code><br>Top logits: {logits}</p>"
            f"{''.join(parts)}{table}</body></html>\n")


def load_texts(path: str | None, count: int) -> list[str]:
    if path is None:
        from lightning_sae.data.text import paragraphs, python_docs

        texts = []
        for document in python_docs():  # the embedded training text
            texts.extend(part for part in paragraphs(document) if len(part) > 40)
            if len(texts) >= count:
                break
        return texts[:count]
    return [line for line in Path(path).read_text().splitlines() if line.strip()][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model folder, or smollm2-135m (the embedded default)")
    parser.add_argument("--transcoders", required=True, type=Path, help="a circuit-tracer folder (config.yaml + safetensors)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--activation", default="exported", choices=["exported", "topk"])
    parser.add_argument("--contexts", help="text file, one context per line (default: paragraphs of the embedded training text)")
    parser.add_argument("--num-contexts", type=int, default=200, help="contexts scanned for each feature's top activations")
    parser.add_argument("--context-tokens", type=int, default=64)
    parser.add_argument("--max-feature-nodes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-logits", type=int, default=5)
    parser.add_argument("--per-layer", type=int, default=3, help="features per layer shown")
    parser.add_argument("--max-edges", type=int, default=150)
    args = parser.parse_args(argv)

    from lightning_sae.data.models import model_location

    torch.set_grad_enabled(True)
    model_dir = model_location(args.model)
    config = read_config(args.transcoders)
    start = time.perf_counter()
    model, graph = build_graph(model_dir, args.transcoders, args.prompt, args.activation, args.max_feature_nodes, args.batch_size, args.max_logits)
    attribution_seconds = time.perf_counter() - start
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    paths = strongest_paths(graph, tokenizer, args.per_layer, args.max_edges)
    features = [node for node in paths["nodes"] if node["kind"] == "feature"]
    start = time.perf_counter()
    top_contexts(model, tokenizer, load_texts(args.contexts, args.num_contexts), features, args.context_tokens, per_feature=3)
    context_seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({
        "input_string": graph.input_string, "input_tokens": graph.input_tokens.cpu(), "adjacency_matrix": graph.adjacency_matrix.cpu(),
        "active_features": graph.active_features.cpu(), "selected_features": graph.selected_features.cpu(),
        "activation_values": graph.activation_values.cpu(), "logit_probabilities": graph.logit_probabilities.cpu(),
        "logit_token_ids": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets]), "n_layers": graph.cfg.n_layers,
        "model_kind": config["model_kind"], "scan": str(graph.scan),
    }, args.out / "graph.pt")
    n_features = len(graph.selected_features)
    # Of the logits' total direct-and-indirect attribution, the share through features rather
    # than error nodes (circuit-tracer's replacement/completeness scores).
    from circuit_tracer.graph import compute_graph_scores

    replacement, completeness = compute_graph_scores(graph)
    summary = {
        "prompt": args.prompt, "model": str(model_dir), "transcoders": str(args.transcoders), "model_kind": config["model_kind"],
        "activation": args.activation, "graph_nodes": int(graph.adjacency_matrix.shape[0]), "active_features": int(graph.active_features.shape[0]),
        "selected_features": n_features, "logits": paths["logits"], "replacement_score": float(replacement),
        "completeness_score": float(completeness), "attribution_seconds": round(attribution_seconds, 1),
        "context_seconds": round(context_seconds, 1), "tokens": paths["tokens"],
        "strongest_paths": {"nodes": paths["nodes"], "edges": paths["edges"]},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = f"Attribution graph ({config['model_kind']}, {args.activation})"
    (args.out / "graph.html").write_text(render_html(paths, args.prompt, graph.cfg.n_layers, title))
    print(f"graph: {summary['graph_nodes']} nodes, {summary['active_features']} active features ({n_features} selected), "
          f"replacement score {replacement:.3f}, completeness {completeness:.3f}, {attribution_seconds:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
