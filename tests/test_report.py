"""tools/report.py: the HTML dashboard of a saved SAE, on a tiny local model and its cache.

Its metrics must be the numbers `lightning-sae validate` logs for the same SAE and data, every
sampled latent must show highlighted contexts, the page must need nothing from outside, and it
must render in a real browser (headless Chromium, where installed)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval_helpers import D_SAE, TinySetup, build
from lightning_sae.cli import main as cli_main

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SPLICED, LATENTS = 8, 8
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def load_report_tool():
    spec = importlib.util.spec_from_file_location("report_tool", TOOLS / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


class PageParser(HTMLParser):
    """Collects what the checks need: metric cells, latent sections and their token spans."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}
        self.latents: dict[int, dict[str, int]] = {}
        self.bars: list[int] = []
        self.caption = ""
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._current: int | None = None
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if "data-metric" in a:
            self.metrics[a["data-metric"]] = float(a["data-value"])
        if tag == "section" and "data-latent" in a:
            self._current = int(a["data-latent"])
            self.latents[self._current] = {"contexts": 0, "active": 0}
        if self._current is not None and a.get("class") == "context":
            self.latents[self._current]["contexts"] += 1
        if self._current is not None and a.get("class") == "tok active":
            self.latents[self._current]["active"] += 1
        if tag == "rect" and a.get("class") == "bar":
            self._in = "bar"
        if a.get("id") == "density-caption":
            self._in = "caption"

    def handle_data(self, data: str) -> None:
        if self._in == "bar" and "latents" in data:
            self.bars.append(int(data.split()[0]))
            self._in = None
        elif self._in == "caption":
            self.caption += data
            self._in = None


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    """Validate an SAE with the CLI, then build its report from the cache validate made."""
    import datasets

    root = tmp_path_factory.mktemp("report")
    tiny: TinySetup = build(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        cli = cli_main(["validate", "--model=sae", f"--model.init_from={tiny.sae_dir}", f"--model.spliced_eval_contexts={SPLICED}",
                        *tiny.data_args(), "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}",
                        "--trainer.enable_progress_bar=false"])
        validated = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
        out = root / "report.html"
        status = load_report_tool().main([
            "--sae", str(tiny.sae_dir), "--cache", str(tiny.cache_dir), "--out", str(out),
            "--batch-size", str(cli.datamodule.batch_size), "--spliced-contexts", str(SPLICED),
            "--latents", str(LATENTS), "--accelerator", "cpu",
        ])
    assert status == 0
    html = out.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(html)
    return {"path": out, "html": html, "parsed": parser, "validated": validated}


def test_metrics_are_validates_numbers(page):
    shown, validated = page["parsed"].metrics, page["validated"]
    for name in ("val/explained_variance", "val/mse", "val/cossim", "val/l0", "val/frac_alive",
                 "val/ce_loss_score", "val/kl_div_score", "val/ce_loss_without_sae", "val/ce_loss_with_sae", "val/ce_loss_with_ablation"):
        assert name in shown, f"{name} missing from the report's table"
    assert set(shown) == set(validated)
    for name, value in validated.items():
        assert shown[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_every_sampled_latent_has_highlighted_contexts(page):
    latents = page["parsed"].latents
    assert len(latents) == LATENTS
    for index, counts in latents.items():
        assert 0 <= index < D_SAE
        assert counts["contexts"] >= 1, f"latent {index} has no context"
        assert counts["active"] >= counts["contexts"], f"latent {index}: a context without a highlighted token"


def test_density_histogram_accounts_for_every_latent(page):
    parsed = page["parsed"]
    fired, total = (int(word) for word in parsed.caption.split()[:3:2])  # "<fired> of <total> latents fired ..."
    assert total == D_SAE and sum(parsed.bars) == fired
    assert fired / total == pytest.approx(page["validated"]["val/frac_alive"])


def test_page_is_self_contained(page):
    for tag, attrs in page["parsed"].tags:
        assert tag not in ("link", "img", "iframe"), f"external asset tag <{tag}>"
        assert not {"src", "href"} & set(attrs), f"<{tag}> loads {attrs}"
        if tag == "script":
            assert attrs.get("type") == "application/json", "the page must run no script"
    assert "url(" not in page["html"] and "@import" not in page["html"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(page, tmp_path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1600"]
    url = page["path"].as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    rendered = PageParser()
    rendered.feed(dom)
    assert rendered.metrics == page["parsed"].metrics
    assert rendered.latents == page["parsed"].latents and rendered.bars == page["parsed"].bars

    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("PIL.Image").open(shot).convert("RGB")
    assert image.size == (1100, 1600)
    # Not a blank page: text, bars and highlights give many distinct colours.
    assert len(image.getcolors(maxcolors=1 << 20)) > 50


def test_core_metrics_are_shown_by_saebench_group(page):
    from lightning_sae.evaluation import CORE_GROUPS

    html, validated = page["html"], page["validated"]
    for group, names in CORE_GROUPS.items():
        if group == "token_stats":  # counts go to the JSON, not to the logger
            continue
        table = html.split(f'data-group="{group}"', 1)[1].split("</table>", 1)[0]
        for name in names:
            assert f'data-metric="val/{name}"' in table, (group, name)
            assert f"val/{name}" in validated
    # One bar height per latent in the closest-latent histogram.
    heights = [int(t.split()[0]) for t in page["html"].split('class="cosine-bar"')[1:] for t in [t.split("<title>", 1)[1]]]
    assert sum(heights) == D_SAE
