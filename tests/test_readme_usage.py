"""Every command of the README's usage block ("## Using it", its fenced bash block) runs and exits 0,
at tiny scale: the block is parsed from README.md, so a line added there is covered here at once.

Each line runs with its own flags, in order, in one working directory (later lines use what
earlier ones wrote, as a reader would: `validate --model.init_from=runs/quickstart/...`). Only
settings the line does not set itself are added, to make it tiny: the embedded SmolLM2 becomes the
tiny random Llama of tests/data_fixtures.py (layer 15 -> 1, layers [5, 10, 15] -> [0, 1, 2]), the
text a small local file, the token budget a few hundred tokens and one epoch; a synthetic config
gets a small synthetic set. `lightning-sae-export SRC DST` gets the SAE an earlier line wrote as
SRC. Each program is the function pyproject.toml's [project.scripts] names, called as its console
script calls it (argv, SystemExit), in this process: a subprocess each would cost seconds of
imports per line.
"""

from __future__ import annotations

import json

import importlib
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from data_fixtures import _isolated_caches, save_model, tiny_root, write_text  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY_TOKENS = 16 * 40  # contexts of 16 tokens


def usage_block() -> list[str]:
    """The command lines of the first ```bash block under "## Using it"."""
    section = README.read_text().split("\n## Using it", 1)
    assert len(section) == 2, "README.md lost its '## Using it' section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block, "README.md's '## Using it' lost its bash block"
    return [line.strip() for line in block.group(1).splitlines() if shlex.split(line, comments=True)]


def console_scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["scripts"]


def run_console_script(program: str, args: list[str]) -> int:
    """What the installed console script does: import its function, call it with sys.argv set."""
    module, function = console_scripts()[program].split(":")
    saved = sys.argv
    sys.argv = [program, *args]
    try:
        result = getattr(importlib.import_module(module), function)()
    except SystemExit as stop:
        result = stop.code
    finally:
        sys.argv = saved
    return 0 if result is None else result if isinstance(result, int) else 1


def setting_keys(args: list[str]) -> set[str]:
    """The settings a command line sets itself (`--model.init_args.k=1` and `--model.k 1` are both model.k)."""
    keys = set()
    for arg in args:
        if arg.startswith("--"):
            keys.add(arg[2:].split("=", 1)[0].replace(".init_args.", "."))
    return keys


def tiny_depth(model_dir: Path) -> int:
    """Layers of the tiny model: a list of every layer of a deep model becomes every tiny layer."""
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def tiny_overrides(config: Path, model_dir: Path, text: Path) -> dict[str, str]:
    """Settings that make a fit of `config` tiny, by what its data and model are."""
    settings = yaml.safe_load(config.read_text())
    data = settings.get("data", {})
    data_args = data.get("init_args", {})
    model_args = settings.get("model", {}).get("init_args", {})
    overrides = {"trainer.max_epochs": "1", "trainer.accelerator": "cpu", "trainer.enable_progress_bar": "false",
                 "trainer.enable_model_summary": "false", "trainer.log_every_n_steps": "5"}
    if data.get("class_path", "").endswith("ActivationDataModule"):
        layers = data_args.get("layer", 1)
        overrides.update({
            "data.model": str(model_dir), "data.dataset": str(text), "data.context_size": "16",
            "data.num_tokens": str(TINY_TOKENS), "data.batch_size": "32", "data.model_batch_size": "8",
            "data.shard_tokens": str(TINY_TOKENS // 4), "data.validation_fraction": "0.1",
            "data.layer": str(list(range(min(len(layers), tiny_depth(model_dir))))) if isinstance(layers, list) else "1",
        })
        if data_args.get("source") == "stream":
            overrides["data.buffer_tokens"] = "256"
        overrides.update({"model.dead_tokens": "200", "model.spliced_eval_contexts": "2"})
    elif "synthetic" in data_args:
        overrides.update({"data.synthetic.num_tokens": "4000", "data.synthetic.d_in": "16",
                          "data.synthetic.num_features": "64", "data.batch_size": "256", "model.dead_tokens": "1000"})
    if "d_sae" in model_args:
        overrides["model.d_sae"] = "128"
    return overrides


def tiny_command(args: list[str], model_dir: Path, text: Path, sae_dirs: list[Path]) -> list[str]:
    """`args` (one README line without its program) with what makes it tiny appended."""
    if args[:1] in (["fit"], ["validate"]) and "--config" in args:
        config = Path(args[args.index("--config") + 1])
        own = setting_keys(args)
        extra = {key: value for key, value in tiny_overrides(config, model_dir, text).items() if key not in own}
        # Matryoshka prefixes are widths inside d_sae: the tiny SAE's 128 latents get tiny prefixes.
        args = ["--model.prefix_sizes=[16,64]" if arg.startswith("--model.prefix_sizes=") else arg for arg in args]
        return args + [f"--{key}={value}" for key, value in extra.items()]
    if "SRC" in args or "DST" in args:
        assert sae_dirs, "the README's export line needs an SAE an earlier line wrote"
        return [str(sae_dirs[0]) if arg == "SRC" else "exported" if arg == "DST" else arg for arg in args]
    return args


@pytest.mark.filterwarnings("ignore")
def test_every_readme_usage_command_exits_0(tiny_root, tmp_path, capsys):  # noqa: F811
    lines = usage_block()
    assert any(" fit " in f" {line} " for line in lines) and any(line.startswith("lightning-sae-export") for line in lines)
    model_dir, text = save_model("llama", tiny_root), write_text(tiny_root)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the lines name configs/... relative to the repository
    scripts = console_scripts()
    for line in lines:
        program, *args = shlex.split(line, comments=True)
        assert program in scripts, f"README line runs {program!r}, which pyproject.toml does not install: {line}"
        sae_dirs = sorted(Path("runs").glob("*/lightning_logs/version_*/sae"), key=lambda path: path.stat().st_mtime)
        command = tiny_command(args, model_dir, text, sae_dirs)
        status = run_console_script(program, command)
        output = capsys.readouterr()
        assert status == 0, f"README line exited {status}: {line}\nran: {program} {shlex.join(command)}\n{output.err[-3000:]}"
        if program == "lightning-sae" and args[0] == "fit":
            # A fit ends by exporting its SAE; a refused extra format is one line, never a traceback.
            assert "Traceback" not in output.err, f"{line}\n{output.err[-3000:]}"
    assert (tmp_path / "exported" / "layers.15" / "cfg.json").is_file()
