"""Nothing trained on damaged data (issue 13): every damage to an activation cache or to a file a
user hands in ends the command with one error line and exit status 2 before any training step;
`rebuild_damaged` recomputes only the damaged shards, to the bytes they had; `lightning-sae cache
verify` names the damaged shards (exit 1).

Each damage is made by hand on a copy of one cache built here, at a place the test chooses, so
the expected line (file, row, token position, byte counts) is known independently of the code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cache_fixtures import QUIET, REPO, SETTINGS, built, data_offset, fit_args, steps  # noqa: F401
from helpers import cli_error_line
import torch
from data_fixtures import VOCAB, _isolated_caches, datamodule, save_model, tiny_root, write_text  # noqa: F401
from safetensors.torch import save_file

from lightning_sae.cli import main
from lightning_sae.data import cache
from lightning_sae.data.cache import read_manifest
from lightning_sae.data_request import DataRequest
from lightning_sae.export_cli import main as export_main
from lightning_sae.formats import save_saelens
from lightning_sae.sae import TopKSAE





@pytest.fixture
def damaged(built, tmp_path) -> tuple[Path, Path, Path]:
    """A fresh copy of the built cache to damage."""
    model, text, source = built
    shutil.copytree(source, tmp_path / "cache")
    return model, text, tmp_path / "cache"



def edit_manifest(cache_dir: Path, edit) -> None:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    edit(manifest)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))


def test_the_intact_cache_trains_and_verifies(damaged, steps, capsys):
    # The control for every test below: the same command on an undamaged copy runs its step.
    model, text, cache_dir = damaged
    main(fit_args(model, text, cache_dir, "--data.verify=full"))
    assert steps == [0]
    with pytest.raises(SystemExit) as stop:
        main(["cache", "verify", str(cache_dir)])
    assert stop.value.code == 0
    assert "all 6 shards intact" in capsys.readouterr().out


# ---- damage inside the shard files --------------------------------------------------------------------
def test_a_flipped_bit_in_the_data_is_found_by_full_verification(damaged, steps, capsys):
    model, text, cache_dir = damaged
    shard = cache_dir / "shard_00002.x.npy"
    data = bytearray(shard.read_bytes())
    data[data_offset(shard) + 1000] ^= 0x04  # a mantissa bit of row 7 (32 floats = 128 bytes a row)
    shard.write_bytes(bytes(data))
    line = cli_error_line(fit_args(model, text, cache_dir, "--data.verify=full"), capsys)
    assert line == (f"lightning-sae: error: the activation cache at {cache_dir} is damaged: shard_00002.x.npy does not "
                    "match its recorded content hash (its bytes changed after it was written). Set "
                    "data.rebuild_damaged=true to recompute only the 1 damaged shard of 6, or delete the cache directory "
                    "and run again to rebuild it")
    assert steps == []


def test_a_flip_that_makes_nan_names_the_row(damaged, steps, capsys):
    model, text, cache_dir = damaged
    shard = cache_dir / "shard_00003.x.npy"
    values = np.load(shard, mmap_mode="r+")
    values[11, 5] = np.float32("nan")  # an exponent of all ones, as flipped bits can make
    values.flush()
    del values
    line = cli_error_line(fit_args(model, text, cache_dir, "--data.verify=full"), capsys)
    assert "shard_00003.x.npy does not match its recorded content hash (its bytes changed after it was written); " \
           "row 11 now holds NaN/inf." in line
    assert steps == []


def test_appended_junk_is_found_from_the_length(damaged, steps, capsys):
    model, text, cache_dir = damaged
    with open(cache_dir / "shard_00004.x.npy", "ab") as handle:
        handle.write(b"junk!!!")
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)  # the default verify: header
    assert f"the activation cache at {cache_dir} is damaged: shard_00004.x.npy has 7 bytes after its data (appended to?)" in line
    assert steps == []


def test_a_truncated_shard_names_its_bytes(damaged, steps, capsys):
    model, text, cache_dir = damaged
    shard = cache_dir / "shard_00001.tokens.npy"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-10])
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert f"shard_00001.tokens.npy is missing, truncated or corrupt ({size - 10} of its {size} bytes)" in line
    assert steps == []


def test_token_ids_outside_the_vocabulary(damaged, steps, capsys):
    # Hash recorded for the bad ids, as if the cache had been written so: only the range check
    # stands between these ids and the model's embedding (an IndexError in spliced evaluation).
    model, text, cache_dir = damaged
    shard = cache_dir / "shard_00005.tokens.npy"
    tokens = np.load(shard)
    tokens[1, 5], tokens[2, 0] = VOCAB + 44, -3
    np.save(shard, tokens)
    edit_manifest(cache_dir, lambda m: m["shards"][5]["hashes"].update(tokens=cache.file_hash(shard)))
    for verify in ("header", "full"):
        line = cli_error_line(fit_args(model, text, cache_dir, f"--data.verify={verify}"), capsys)
        assert (f"shard_00005.tokens.npy holds token id {VOCAB + 44} at context 1, position 5 (2 ids in all) lies outside "
                f"the model's vocabulary of {VOCAB}") in line
    assert steps == []


def test_a_cache_from_before_hashes_reads_with_header_checks_only(damaged, steps, capsys):
    model, text, cache_dir = damaged

    def as_format_2(manifest):
        manifest.update(format=2)
        del manifest["hash"]
        for shard in manifest["shards"]:
            del shard["hashes"]

    edit_manifest(cache_dir, as_format_2)
    line = cli_error_line(fit_args(model, text, cache_dir, "--data.verify=full"), capsys)
    assert line.endswith(f"the activation cache at {cache_dir} was written before content hashes (format 2), so verify=full "
                         "cannot check it: set data.verify=header to read it with header checks only, or delete it and "
                         "run again to rebuild it with hashes")
    assert steps == []
    main(fit_args(model, text, cache_dir))
    assert steps == [0]


def test_verify_off_reads_without_checking(damaged, steps):
    # What "off" means: appended bytes are not even looked at.
    model, text, cache_dir = damaged
    with open(cache_dir / "shard_00004.x.npy", "ab") as handle:
        handle.write(b"junk")
    main(fit_args(model, text, cache_dir, "--data.verify=off"))
    assert steps == [0]


# ---- damage to the manifest ---------------------------------------------------------------------------
def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
    return edit


def _drop(path: str):
    def edit(manifest):
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        del target[last]
    return edit


INVALID = "the activation cache manifest {manifest} is invalid: "
FIELD_EDITS = {
    # field: (edit, what the line says after "is invalid: " (or the whole clause for other errors), verify)
    "rows.train": (lambda m: m["rows"].update(train=m["rows"]["train"] + 1), "'rows.train' is {train1}, but its train shards hold {train} rows"),
    "rows.val": (lambda m: m["rows"].update(val=0), "'rows.val' is 0, but its val shards hold {val} rows"),
    "tokens": (lambda m: m.update(tokens=m["tokens"] - 16), "'tokens' is 624, but its shards hold 40 contexts of 16 tokens"),
    "shards.split (val to train)": (_set("shards.0.split", "train"), "its validation shards hold 0 contexts, but the settings (num_tokens 640, context_size 16, validation_fraction 0.05) hold out 2"),
    "shards.split (train to val)": (_set("shards.3.split", "val"), "'shards[3].split' is 'val' after training shards (validation shards come first)"),
    "shards.contexts": (_set("shards.2.contexts", 9), "'shards[2].contexts' is 9, expected 1 to 8 (shard_tokens // context_size)"),
    "shards.rows": (_set("shards.2.rows", 200), "'shards[2].rows' is 200, but 8 contexts of 16 tokens hold 0 to 128"),
    "shards.rows and rows": (lambda m: (m["shards"][2].update(rows=m["shards"][2]["rows"] - 1), m["rows"].update(train=m["rows"]["train"] - 1)),
                             "the activation cache at {cache} is damaged: shard_00002.x.npy holds float32 [{r2}, 32], the manifest says float32 [{r2m1}, 32]"),
    "shards.file (a duplicate)": (_set("shards.3.file", "shard_00002"), "'shards[3].file' is 'shard_00002', which another shard entry names too"),
    "shards.file (another writer)": (_set("shards.3.file", "shard_w1_00003"), "'shards[3].file' is 'shard_w1_00003', a shard of writer 1, but the cache had 1 writers"),
    "shards.file (no such shard)": (_set("shards.3.file", "shard_00017"), "the activation cache at {cache} is damaged: shard_00017.x.npy is missing"),
    "shards.hashes": (_set("shards.4.hashes.x", "0" * 32), "the activation cache at {cache} is damaged: shard_00004.x.npy does not match its recorded content hash"),
    "shards.hashes (not hex)": (_set("shards.4.hashes.tokens", "xyz"), "'shards[4].hashes.tokens' is 'xyz', expected 32 hexadecimal digits"),
    "widths": (_set("widths.x", 31), "the activation cache at {cache} is damaged: shard_00000.x.npy holds float32 [{r0}, 32], the manifest says float32 [{r0}, 31]"),
    "widths (a type)": (_set("widths.x", "32"), "'widths.x' is '32', expected a positive integer"),
    "format": (_set("format", 1), "{cache} holds cache format 1, this library reads [2, 3] and writes 3"),
    "hash": (_set("hash", "md5"), "'hash' is 'md5'; this library hashes with 'xxh3_128'"),
    "settings.model_dtype": (_set("settings.model_dtype", "bfloat16"), "{cache} holds activations made with other settings (model_dtype: cache has 'bfloat16', wanted 'float32')"),
    "settings.context_size": (_set("settings.context_size", 8), "'shards[0].rows' is {r0}, but 2 contexts of 8 tokens hold 0 to 16"),
    "settings.validation_fraction": (_set("settings.validation_fraction", 0.5), "its validation shards hold 2 contexts, but the settings (num_tokens 640, context_size 16, validation_fraction 0.5) hold out 20"),
    "settings.cache_dtype": (_set("settings.cache_dtype", "int8"), "'settings.cache_dtype' is 'int8', expected one of ['bfloat16', 'float16', 'float32']"),
    "complete (a type)": (_set("complete", "yes"), "'complete' is 'yes', expected true or false"),
}


@pytest.mark.parametrize("field", list(FIELD_EDITS))
def test_each_manifest_field_edited(field, damaged, steps, capsys):
    model, text, cache_dir = damaged
    before = read_manifest(cache_dir)
    edit, expected = FIELD_EDITS[field]
    edit_manifest(cache_dir, edit)
    line = cli_error_line(fit_args(model, text, cache_dir, "--data.verify=full"), capsys)
    shard_rows = [shard["rows"] for shard in before["shards"]]
    expected = expected.format(cache=cache_dir, manifest=cache_dir / "manifest.json", train=before["rows"]["train"],
                               train1=before["rows"]["train"] + 1, val=before["rows"]["val"], r0=shard_rows[0],
                               r2=shard_rows[2], r2m1=shard_rows[2] - 1)
    if expected.startswith("'") or expected.startswith("its "):
        expected = INVALID.format(manifest=cache_dir / "manifest.json") + expected
    assert expected in line, line
    assert steps == []


@pytest.mark.parametrize("key", ["settings", "shards", "widths", "format", "complete", "hash", "tokens", "rows",
                                 "rows.val", "settings.cache_dtype", "settings.context_size", "shards.1.hashes",
                                 "shards.1.file", "shards.1.rows", "shards.1.split"])
def test_a_removed_key(key, damaged, steps, capsys):
    model, text, cache_dir = damaged
    edit_manifest(cache_dir, _drop(key))
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    name = key.replace("shards.1.", "shards[1].") if key.startswith("shards.1.") else key
    assert line.startswith(f"lightning-sae: error: {INVALID.format(manifest=cache_dir / 'manifest.json')}it has no '{name}'"), line
    assert line.endswith("; delete the cache directory (or only its manifest) and run again to rebuild it")
    assert steps == []


def test_garbage_json_manifest(damaged, steps, capsys):
    model, text, cache_dir = damaged
    (cache_dir / "manifest.json").write_text('{"format": 3, "settings": {')
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert f"{cache_dir / 'manifest.json'} is not valid JSON (Expecting property name enclosed in double quotes" in line
    (cache_dir / "manifest.json").write_text("[1, 2]")
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert line.endswith("is invalid: it holds a JSON list, not an object; delete the cache directory (or only its "
                         "manifest) and run again to rebuild it")
    assert steps == []


def test_from_cache_reports_a_bad_manifest_in_one_line(damaged):
    from lightning_sae.data import ActivationDataModule

    _, _, cache_dir = damaged
    assert ActivationDataModule.from_cache(cache_dir).num_tokens == 640
    edit_manifest(cache_dir, _drop("settings"))
    with pytest.raises(cache.ManifestError, match="it has no 'settings'"):
        ActivationDataModule.from_cache(cache_dir)


# ---- rebuilding only the damaged shards -------------------------------------------------------------------
def test_rebuild_damaged_recomputes_only_the_damaged_shards_to_their_bytes(damaged, built, steps, monkeypatch):
    model, text, cache_dir = damaged
    source = built[2]
    flipped = bytearray((cache_dir / "shard_00002.x.npy").read_bytes())
    flipped[-3] ^= 0x80
    (cache_dir / "shard_00002.x.npy").write_bytes(bytes(flipped))
    (cache_dir / "shard_00004.tokens.npy").write_bytes(b"\x93NUMPY garbage")
    untouched = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard_*") if not p.name.startswith(("shard_00002", "shard_00004"))}
    passes = []
    forward = cache.Extractor.__call__
    monkeypatch.setattr(cache.Extractor, "__call__", lambda self, tokens: passes.append(len(tokens)) or forward(self, tokens))

    main(fit_args(model, text, cache_dir, "--data.verify=full", "--data.rebuild_damaged=true"))
    assert steps == [0]
    assert passes == [8, 8]  # one forward pass of 8 contexts for each of the two damaged shards
    for path in sorted(source.iterdir()):
        assert (cache_dir / path.name).read_bytes() == path.read_bytes(), path.name
    assert {name: (cache_dir / name).stat().st_mtime_ns for name in untouched} == untouched


def test_rebuild_finds_a_shard_of_another_writer(built, tmp_path, monkeypatch):
    # A cache written by two ranks (one process playing each in turn): shard_w1_00001 holds
    # training contexts 3, 5 and 7 ... of the text, found from its writer and index alone.
    model, text, _ = built
    request = DataRequest()

    def two_writers(path: Path):
        dm = datamodule(model, text, path, request, **SETTINGS)
        routing = dm.routing()
        for writer in (0, 1):
            dm._build_cache(routing, writer, 2)
        cache.merge_writers(path, 2)

    two_writers(tmp_path / "clean")
    two_writers(tmp_path / "cache")
    names = [s["file"] for s in read_manifest(tmp_path / "cache")["shards"]]
    assert "shard_w1_00001" in names and read_manifest(tmp_path / "cache")["writers"] == 2
    shard = tmp_path / "cache" / "shard_w1_00001.x.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    dm = datamodule(model, text, tmp_path / "cache", request, **SETTINGS, verify="full", rebuild_damaged=True)
    dm.setup("fit")
    for path in sorted((tmp_path / "clean").glob("shard_*")):
        assert (tmp_path / "cache" / path.name).read_bytes() == path.read_bytes(), path.name


# ---- lightning-sae cache verify ---------------------------------------------------------------------------
def test_cache_verify_names_the_damaged_shards(damaged, capsys):
    _, _, cache_dir = damaged
    changed = bytearray((cache_dir / "shard_00001.x.npy").read_bytes())
    changed[-1] ^= 0x01
    (cache_dir / "shard_00001.x.npy").write_bytes(bytes(changed))
    (cache_dir / "shard_00003.tokens.npy").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["cache", "verify", str(cache_dir)])
    out = capsys.readouterr().out
    assert stop.value.code == 1
    damaged_lines = [line for line in out.splitlines() if line.startswith("lightning-sae cache verify: damaged: ")]
    assert damaged_lines == [
        "lightning-sae cache verify: damaged: shard_00001: shard_00001.x.npy does not match its recorded content hash "
        "(its bytes changed after it was written)",
        "lightning-sae cache verify: damaged: shard_00003: shard_00003.tokens.npy is missing",
    ]
    assert "2 of 6 shards damaged: shard_00001, shard_00003." in out
    with pytest.raises(SystemExit) as stop:  # headers only: the changed byte passes, the missing file does not
        main(["cache", "verify", "--level", "header", str(cache_dir)])
    assert stop.value.code == 1 and "1 of 6 shards damaged: shard_00003." in capsys.readouterr().out


def test_cache_verify_on_a_bad_manifest_or_no_cache(damaged, tmp_path, capsys):
    _, _, cache_dir = damaged
    edit_manifest(cache_dir, _set("tokens", 3))
    with pytest.raises(SystemExit) as stop:
        main(["cache", "verify", str(cache_dir)])
    assert stop.value.code == 1
    assert "damaged: the activation cache manifest" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["cache", "verify", str(tmp_path / "nothing")])
    assert stop.value.code == 2
    assert f"{tmp_path / 'nothing'} holds no activation cache (no manifest.json)" in capsys.readouterr().err


def test_the_installed_command_verifies_a_cache(built):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "lightning_sae.cli", "cache", "verify", str(built[2])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("lightning-sae cache verify: all 6 shards intact")


# ---- files a user hands in -----------------------------------------------------------------------------------
def tensor_args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--model=sae", "--model.k=4", "--model.d_sae=64", "--data=lightning_sae.tensor_data.TensorDataModule",
        f"--data.path={data}", "--data.batch_size=64", "--trainer.max_steps=1", "--trainer.accelerator=cpu",
        "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={root}",
        *QUIET, *extra,
    ]


@pytest.fixture
def activations(tmp_path) -> Path:
    save_file({"x": torch.randn(520, 16, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "x.safetensors"))
    return tmp_path / "x.safetensors"


def saved_sae(path: Path, d_in: int = 16) -> Path:
    torch.manual_seed(0)
    return save_saelens(TopKSAE(d_in, 64, 4), path)


def test_init_from_damaged_sae_directories(activations, tmp_path, steps, capsys):
    sae = saved_sae(tmp_path / "sae")
    weights, cfg = sae / "sae_weights.safetensors", sae / "cfg.json"
    good_weights, good_cfg = weights.read_bytes(), cfg.read_text()
    cases = [
        (lambda: weights.write_bytes(good_weights[:-50]), f"{weights} is not a readable safetensors file (truncated or corrupt?)"),
        (lambda: cfg.write_text(good_cfg[:40]), f"{cfg} is not valid JSON"),
        (lambda: cfg.write_text(good_cfg.replace('"d_in": 16', '"d_in": 8')),
         f"{weights}: W_enc has shape [16, 64], but cfg.json (d_in=8, d_sae=64) implies [8, 64]"),
        (lambda: cfg.write_text(good_cfg.replace('"d_in": 16', '"d_in": "16"')), f"{cfg}: 'd_in' must be a positive integer, got '16'"),
    ]
    for damage, expected in cases:
        weights.write_bytes(good_weights)
        cfg.write_text(good_cfg)
        damage()
        line = cli_error_line(tensor_args(activations, tmp_path, f"--model.init_from={sae}"), capsys)
        assert expected in line, line
    # Whole files that do not fit: another width than the data's, NaN weights.
    line = cli_error_line(tensor_args(activations, tmp_path, f"--model.init_from={saved_sae(tmp_path / 'wide', 24)}"), capsys)
    assert line.endswith(f"the SAE at {tmp_path / 'wide'} has d_in=24, but the data has width 16")
    bad = TopKSAE(16, 64, 4)
    with torch.no_grad():
        bad.W_dec[3, 2] = float("nan")
    save_saelens(bad, tmp_path / "nan")
    line = cli_error_line(tensor_args(activations, tmp_path, f"--model.init_from={tmp_path / 'nan'}"), capsys)
    assert f"{tmp_path / 'nan' / 'sae_weights.safetensors'}: W_dec holds NaN/inf in 1 of 1024 values; the file is damaged" in line
    assert steps == []


def test_checkpoints_that_do_not_fit_or_are_cut(activations, tmp_path, steps, capsys):
    main(tensor_args(activations, tmp_path / "first", "--trainer.enable_checkpointing=true"))
    assert steps == [0]
    ckpt = next((tmp_path / "first").rglob("*.ckpt"))
    # Its hyperparameters say d_sae 64 (the CLI builds the model from them), its weights 32.
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["sae.W_enc"] = checkpoint["state_dict"]["sae.W_enc"][:32]
    torch.save(checkpoint, tmp_path / "reshaped.ckpt")
    line = cli_error_line(tensor_args(activations, tmp_path, f"--ckpt_path={tmp_path / 'reshaped.ckpt'}"), capsys)
    assert line.startswith(f"lightning-sae: error: {tmp_path / 'reshaped.ckpt'} does not fit this model (1 mismatch; first: ")
    assert "size mismatch for sae.W_enc: copying a param with shape torch.Size([32, 16]) from checkpoint, the shape in " \
           "current model is torch.Size([64, 16])." in line
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:-200])
    for setting in ("--model.init_from", "--ckpt_path"):
        line = cli_error_line(tensor_args(activations, tmp_path, f"{setting}={cut}"), capsys)
        assert f"{cut} is not a readable checkpoint (truncated or corrupt?)" in line
    assert steps == [0]  # only the first, undamaged fit trained


def test_truncated_safetensors_named_by_their_setting(activations, tmp_path, steps, capsys):
    activations.write_bytes(activations.read_bytes()[:-100])
    line = cli_error_line(tensor_args(activations, tmp_path), capsys)
    assert f"data.path: {activations} is not a readable safetensors file (truncated or corrupt?)" in line
    mlp = tmp_path / "mlp.safetensors"
    save_file({"W_in": torch.randn(64, 16), "W_out": torch.randn(16, 64), "b_in": torch.zeros(64), "b_out": torch.zeros(16)},
              str(mlp), metadata={"family": "gelu"})
    mlp.write_bytes(mlp.read_bytes()[:-7])
    save_file({"x": torch.randn(520, 16), "y": torch.randn(520, 16)}, str(tmp_path / "xy.safetensors"))
    args = tensor_args(tmp_path / "xy.safetensors", tmp_path, f"--model.mlp_weights={mlp}")
    line = cli_error_line([a if a != "--model=sae" else "--model=jsae" for a in args], capsys)
    assert f"model.mlp_weights: {mlp} is not a readable safetensors file (truncated or corrupt?)" in line
    assert steps == []


def test_export_exits_2_with_one_line_for_each_damage(tmp_path, capsys):
    sae = saved_sae(tmp_path / "sae")
    weights, cfg = sae / "sae_weights.safetensors", sae / "cfg.json"
    good_weights, good_cfg = weights.read_bytes(), cfg.read_text()
    cases = [
        (lambda: weights.write_bytes(good_weights[:-50]), f"{weights} is not a readable safetensors file (truncated or corrupt?)"),
        (lambda: cfg.write_text("{garbage"), f"{cfg} is not valid JSON"),
        (lambda: cfg.write_text(good_cfg.replace('"d_sae": 64', '"d_sae": 32')),
         f"{weights}: W_enc has shape [16, 64], but cfg.json (d_in=16, d_sae=32) implies [16, 32]"),
        (lambda: cfg.write_text("[]"), f"{cfg} must hold a JSON object"),
    ]
    for damage, expected in cases:
        weights.write_bytes(good_weights)
        cfg.write_text(good_cfg)
        damage()
        capsys.readouterr()
        assert export_main([str(sae), str(tmp_path / "out"), "--format", "sparsify", "--hookpoint", "h"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lightning-sae-export: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "2 on bad input" in " ".join(capsys.readouterr().out.split())
