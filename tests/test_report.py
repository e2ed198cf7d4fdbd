"""tools/report.py: the latent browser of a saved SAE, on a tiny local model and its cache.

Its metrics must be the numbers `lightning-sae validate` logs for the same SAE and data; every
per-latent statistic must match a brute-force pass (the model and the SAE run densely on the
same sampled contexts, reduced with plain tensor operations); logit effects and neighbours must
match the weights; the page must need nothing from outside and, in a real browser (headless
Chromium, where installed), show a latent's panel and filter its index."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from eval_helpers import D_SAE, TinySetup, build
from lightning_sae.cli import main as cli_main

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SPLICED, SAMPLE, TOP = 8, 2048, 10
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def load_report_tool():
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location("report_tool", TOOLS / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


class PageParser(HTMLParser):
    """Collects what the checks need: metric cells, index rows, tags, the inline JSON, and the panel."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}
        self.rows: dict[int, dict] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.json: dict[str, str] = {}
        self.panel_latent: str | None = None
        self.panel_contexts = self.panel_active = 0
        self._row: int | None = None
        self._script: str | None = None
        self._in_panel = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if "data-metric" in a:
            self.metrics[a["data-metric"]] = float(a["data-value"])
        if tag == "tr" and "data-latent" in a:
            self._row = int(a["data-latent"])
            self.rows[self._row] = {"hidden": "hidden" in a, "text": ""}
        if tag == "script" and a.get("type") == "application/json":
            self._script = a["id"]
            self.json[self._script] = ""
        if tag == "section" and a.get("id") == "panel":
            self._in_panel, self.panel_latent = True, a.get("data-latent")
        classes = (a.get("class") or "").split()
        if self._in_panel and "context" in classes:
            self.panel_contexts += 1
        if self._in_panel and "active" in classes:
            self.panel_active += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "script":
            self._script = None
        if tag == "section":
            self._in_panel = False

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self.rows[self._row]["text"] += data
        if self._script is not None:
            self.json[self._script] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    """Validate an SAE with the CLI, then build its browser from the cache validate made."""
    import datasets

    root = tmp_path_factory.mktemp("report")
    tiny: TinySetup = build(root)
    tool = load_report_tool()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        cli = cli_main(["validate", "--model=sae", f"--model.init_from={tiny.sae_dir}", f"--model.spliced_eval_contexts={SPLICED}",
                        *tiny.data_args(), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}",
                        "--trainer.enable_progress_bar=false"])
        validated = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
        out = root / "report.html"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = tool.main([
            "--sae", str(tiny.sae_dir), "--cache", str(tiny.cache_dir), "--out", str(out),
            "--batch-size", str(cli.datamodule.batch_size), "--spliced-contexts", str(SPLICED),
                "--sample-tokens", str(SAMPLE), "--top", str(TOP), "--accelerator", "cpu",
            ])
        reference = brute_force(tool, tiny)
    assert status == 0
    html = out.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(html)
    data = json.loads(parser.json["latent-data"])
    return {"path": out, "html": html, "parsed": parser, "validated": validated, "data": data, "reference": reference,
            "stdout": printed.getvalue()}


@torch.no_grad()
def brute_force(tool, tiny: TinySetup) -> dict:
    """The sampled contexts run through the model and the SAE densely: [positions, d_sae] codes."""
    from lightning_sae.data import ActivationDataModule
    from lightning_sae.formats import load_sae

    datamodule = ActivationDataModule.from_cache(tiny.cache_dir, device="cpu")
    tokenizer = datamodule.load_tokenizer()
    contexts = torch.stack(list(datamodule.context_plan(limit_training=False).training()))[: SAMPLE // 16]
    model = datamodule.load_language_model()
    hidden = model(input_ids=contexts, output_hidden_states=True).hidden_states[2]  # layer 1's output
    sae, _ = load_sae(tiny.sae_dir)
    w_enc = sae.W_enc if sae.W_enc.shape[0] == sae.d_in else sae.W_enc.T  # [d_in, d_sae]
    pre = torch.relu((hidden.flatten(0, 1) - sae.b_dec) @ w_enc + sae.b_enc)  # [positions, d_sae]
    top = pre.topk(sae.k, dim=1)
    dense = torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))
    dense[(contexts == tokenizer.bos_token_id).flatten()] = 0  # BOS is not a row
    kept = int((contexts != tokenizer.bos_token_id).sum())
    return {"contexts": contexts, "dense": dense, "kept": kept, "sae": sae, "model": model}


def test_the_sample_ends_with_one_plain_progress_line_for_what_was_read(page):
    # Not a terminal here: plain lines, not a bar. The tiny text ends before --sample-tokens, so
    # the closing line counts the tokens read as the whole sample, not a share of the request.
    sampled = page["reference"]["contexts"].numel()
    lines = [line for line in page["stdout"].splitlines() if line.startswith("lightning-sae: latent browser sample:")]
    assert lines and lines[-1].startswith(f"lightning-sae: latent browser sample: {sampled:,}/{sampled:,} tok (100%)")
    assert lines[-1].endswith("(done)")


def test_metrics_are_validates_numbers(page):
    shown, validated = page["parsed"].metrics, page["validated"]
    for name in ("val/explained_variance", "val/mse", "val/cossim", "val/l0", "val/frac_alive",
                 "val/ce_loss_score", "val/kl_div_score", "val/ce_loss_without_sae", "val/ce_loss_with_sae", "val/ce_loss_with_ablation"):
        assert name in shown, f"{name} missing from the report's table"
    assert set(shown) == set(validated)
    for name, value in validated.items():
        assert shown[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_every_latent_is_in_the_index_and_the_data(page):
    assert sorted(page["parsed"].rows) == list(range(D_SAE))
    assert [latent["i"] for latent in page["data"]["latents"]] == list(range(D_SAE))


def test_per_latent_statistics_match_a_brute_force_pass(page):
    dense, contexts, kept = page["reference"]["dense"], page["reference"]["contexts"], page["reference"]["kept"]
    size = contexts.shape[1]
    fired = (dense > 0).sum(0)
    for latent in page["data"]["latents"]:
        i = latent["i"]
        column = dense[:, i]
        assert latent["sample_density"] == pytest.approx(float(fired[i]) / kept, rel=1e-6)
        assert latent["max"] == pytest.approx(float(column.max()), rel=1e-3, abs=1e-4)
        expected_top = column.topk(TOP).values
        expected_top = expected_top[expected_top > 0]
        assert [ex["act"] for ex in latent["top"]] == pytest.approx(expected_top.tolist(), rel=1e-3, abs=1e-3)
        examples = latent["top"] + [ex for band in latent["bands"] for ex in band["examples"]]
        for ex in examples:
            position = ex["context"] * size + ex["position"]
            assert ex["act"] == pytest.approx(float(column[position]), rel=1e-3, abs=1e-3)
            window = contexts[ex["context"]].tolist()
            start = ex["position"] - ex["peak"]
            assert ex["tokens"] == window[start : start + len(ex["tokens"])]
            for offset, act in ex["acts"].items():  # every highlighted token really fires this latent
                assert act == pytest.approx(float(column[ex["context"] * size + start + int(offset)]), rel=1e-2, abs=1e-2)
            highlighted = {int(o) for o in ex["acts"]}
            firing = {t - start for t in range(start, start + len(ex["tokens"])) if column[ex["context"] * size + t] > 0}
            assert highlighted == firing
        for band in latent["bands"]:
            assert all(band["low"] <= ex["act"] <= band["high"] for ex in band["examples"])
        if latent["bands"]:
            lows = [band["low"] for band in latent["bands"]]
            assert lows == sorted(lows)
        assert (latent["hist"] or "").startswith("data:image/png;base64,") == bool(fired[i])
    dead = [int(m) for m in re.findall(r'href="#latent-(\d+)"', page["html"].split('id="dead-latents"', 1)[1].split("</p>", 1)[0])]
    assert dead == [i for i in range(D_SAE) if fired[i] == 0]


def test_latent_stats_against_plain_reductions():
    """LatentStats fed random codes in three batches: counts, histogram, top values, reservoir."""
    stats_module = load_report_tool() and sys.modules["report_stats"]
    generator = torch.Generator().manual_seed(0)
    d_sae, size, k, contexts = 12, 8, 3, 9
    dense = torch.zeros(contexts * size, d_sae)
    stats = stats_module.LatentStats(d_sae, size, top=4, reservoir=5)
    for first in range(0, contexts, 3):
        positions = 3 * size
        pre = torch.rand(positions, d_sae, generator=generator) * 10 ** torch.randint(-2, 3, (positions, d_sae), generator=generator)
        top = pre.topk(k, dim=1)
        kept = torch.rand(positions, generator=generator) > 0.2
        token, latent, value = stats_module.flat_code(top.indices, top.values, None, positions)
        stats.add(first * size, positions, token, latent, value, kept)
        dense[first * size : (first + 3) * size] = torch.zeros(positions, d_sae).scatter(1, top.indices, top.values) * kept[:, None]
    stats.finish()
    assert stats.fired.tolist() == (dense > 0).sum(0).tolist()
    assert stats.histogram.sum(1).tolist() == (dense > 0).sum(0).tolist()
    lo, hi = stats_module.HIST_LOG10_RANGE
    bins = ((dense[dense > 0].log10() - lo) / (hi - lo) * stats_module.HIST_BINS).long().clamp(0, stats_module.HIST_BINS - 1)
    assert int(stats.histogram.sum(0)[bins.unique()].sum()) == int((dense > 0).sum())
    torch.testing.assert_close(stats.top_values, dense.topk(4, dim=0).values.T)
    for latent in range(d_sae):
        for example in stats.sampled_firings(latent):  # the reservoir holds real firings, each once
            assert dense[example.context * size + example.position, latent] == pytest.approx(example.activation)
        assert len(stats.sampled_firings(latent)) == min(5, int((dense[:, latent] > 0).sum()))
        window = stats.activations_in(latent, 10, 30)
        assert window == pytest.approx({p: float(dense[p, latent]) for p in range(10, 31) if dense[p, latent] > 0}, rel=1e-3)


def test_logit_effects_and_neighbours_match_the_weights(page):
    sae, model = page["reference"]["sae"], page["reference"]["model"]
    logits = torch.einsum("ld,vd->lv", sae.W_dec.double(), model.lm_head.weight.double() * model.model.norm.weight.double())
    unit = sae.W_dec.double() / sae.W_dec.double().norm(dim=1, keepdim=True)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-2)
    for latent in page["data"]["latents"]:
        i, count = latent["i"], len(latent["promoted"])
        assert [t for t, _ in latent["promoted"]] == logits[i].argsort(descending=True)[:count].tolist()
        assert [t for t, _ in latent["suppressed"]] == logits[i].argsort()[:count].tolist()
        assert [v for _, v in latent["promoted"]] == pytest.approx(logits[i].sort(descending=True).values[:count].tolist(), abs=1e-3)
        assert [n for n, _ in latent["neighbours"]] == cosine[i].argsort(descending=True)[: len(latent["neighbours"])].tolist()


def test_density_caption_accounts_for_every_latent(page):
    caption = page["html"].split('id="density-histogram-caption">', 1)[1].split("</p>", 1)[0]
    fired, total = (int(word) for word in caption.split()[:3:2])  # "<fired> of <total> latents fired ..."
    assert total == D_SAE and fired / total == pytest.approx(page["validated"]["val/frac_alive"])


def test_page_is_self_contained(page):
    for tag, attrs in page["parsed"].tags:
        assert tag not in ("link", "iframe"), f"external asset tag <{tag}>"
        assert (attrs.get("src") or "data:").startswith("data:"), f"<{tag}> loads {attrs['src'][:40]}"
        assert (attrs.get("href") or "#").startswith("#"), f"<{tag}> links to {attrs['href']}"
    assert "url(" not in page["html"] and "@import" not in page["html"]
    assert any(tag == "img" and attrs["id"] == "density-histogram" for tag, attrs in page["parsed"].tags), "matplotlib plot missing"


def _chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=5000"]
    return subprocess.run([*flags, *extra, url], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_a_browser_shows_a_latents_panel_and_filters_the_index(page, tmp_path):
    data = page["data"]
    latent = max(data["latents"], key=lambda entry: len(entry["top"]))
    url = page["path"].as_uri()
    dom = _chromium(f"{url}#latent-{latent['i']}", f"--user-data-dir={tmp_path / 'one'}", "--dump-dom").stdout
    shown = PageParser()
    shown.feed(dom)
    assert shown.panel_latent == str(latent["i"])
    examples = len(latent["top"]) + sum(len(band["examples"]) for band in latent["bands"])
    assert shown.panel_contexts == examples and shown.panel_active >= examples
    assert shown.metrics == page["parsed"].metrics

    query = data["vocab"][str(latent["top"][0]["tokens"][latent["top"][0]["peak"]])].strip()
    dom = _chromium(f"{url}?q={query}", f"--user-data-dir={tmp_path / 'two'}", "--dump-dom").stdout
    filtered = PageParser()
    filtered.feed(dom)
    visible = {i for i, row in filtered.rows.items() if not row["hidden"]}
    expected = {i for i, row in page["parsed"].rows.items() if query.lower() in row["text"].lower() or str(i) == query}
    assert visible == expected and 0 < len(visible) < D_SAE

    shot = tmp_path / "report.png"
    _chromium(f"{url}#latent-{latent['i']}", f"--user-data-dir={tmp_path / 'three'}", f"--screenshot={shot}", "--window-size=1200,1400")
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    assert image.size == (1200, 1400)
    # The panel's highlighted tokens: many pixels of the highlight colour's hue (orange).
    orange = sum(count for count, (r, g, b) in image.getcolors(maxcolors=1 << 20) if r > 200 and 100 < g < 200 and b < 120)
    assert orange > 500
