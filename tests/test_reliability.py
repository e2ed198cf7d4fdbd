"""Reliability (issue 8): bad input gets one clear line and a non-zero exit, a non-finite loss
stops training without spoiling the last checkpoint, checkpoints are written atomically and never
run code when read, and reading a memory-mapped cache for many epochs keeps memory flat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from helpers import cli_error_line
import torch
from cache_fixtures import QUIET
from cache_fixtures import fit_args as lm_args
from data_fixtures import _isolated_caches, save_model, tiny_root, write_text  # noqa: F401
from safetensors.torch import save_file

import lightning_sae.checkpoint_io as checkpoint_io
from lightning_sae.callbacks import NonFiniteGuard
from lightning_sae.checkpoint_io import AtomicCheckpointIO
from lightning_sae.cli import main
from lightning_sae.errors import NonFiniteLossError
from lightning_sae.export_cli import main as export_main
from lightning_sae.module import SAEModule
from lightning_sae.tensor_data import TensorDataModule

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ------------------------------------------------------------------------------------------
def tensor_file(path: Path, rows: int = 520, width: int = 16, seed: int = 0) -> Path:
    save_file({"x": torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def tensor_args(path: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything=0", "--model=sae", "--model.k=4", "--model.d_sae=64",
        "--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={path}", "--data.batch_size=64",
        "--data.validation_fraction=0.1", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}", *QUIET, *extra,
    ]


@pytest.fixture(scope="module")
def built_cache(tiny_root, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, text file, a finished cache for them with the lm_args settings)."""
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    cache = tmp_path_factory.mktemp("reliability") / "cache"
    from data_fixtures import datamodule

    from lightning_sae.data_request import DataRequest

    datamodule(model, text, cache, DataRequest(), context_size=16, num_tokens=640, shard_tokens=128,
               validation_fraction=0.05, model_batch_size=8).prepare_data()
    return model, text, cache


# ---- bad input: one line, what was wrong and what is valid, exit 2 ---------------------------------------
def test_unknown_model_folder_or_name(tiny_root, tmp_path, capsys):
    text = write_text(tiny_root)
    line = cli_error_line(lm_args(tmp_path / "no_such_model", text, tmp_path / "c"), capsys)
    assert "no_such_model' is not a model folder" in line and "a Hugging Face hub name, or 'smollm2-135m'" in line
    line = cli_error_line(lm_args(Path("nosuch-org/nosuch-model"), text, tmp_path / "c"), capsys)  # offline in tests
    assert "'nosuch-org/nosuch-model' is not a local folder, and the Hugging Face hub has none" in line
    (tmp_path / "empty_dir").mkdir()
    line = cli_error_line(lm_args(tmp_path / "empty_dir", text, tmp_path / "c"), capsys)
    assert "has no config.json" in line


def test_unknown_dataset_path(tiny_root, tmp_path, capsys):
    line = cli_error_line(lm_args(save_model("llama", tiny_root), tmp_path / "missing.txt", tmp_path / "c"), capsys)
    assert "cannot read dataset" in line and "missing.txt" in line and "'python-docs', a `datasets` hub name" in line


def test_unknown_hook_and_layer_out_of_range(tiny_root, tmp_path, capsys):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    line = cli_error_line(lm_args(model, text, tmp_path / "c", "--data.hook=resid_mid"), capsys)
    assert "hook point 'layers.1.resid_mid' names no module of LlamaForCausalLM" in line
    assert "Valid hooks are ['resid_pre', 'mlp_in', 'mlp_out', 'resid_post'] or a module path" in line
    line = cli_error_line(lm_args(model, text, tmp_path / "c", "--data.layer=3"), capsys)
    assert line.endswith("layer 3 does not exist: LlamaForCausalLM has layers 0..2")


@pytest.mark.parametrize("k", [0, 65])
def test_k_outside_one_to_d_sae(k, tmp_path, capsys):
    line = cli_error_line(tensor_args(tensor_file(tmp_path / "x.safetensors"), tmp_path, f"--model.k={k}"), capsys)
    assert line.endswith(f"k must satisfy 1 <= k <= d_sae (64), got k={k}")


def test_dataset_without_the_text_column(tiny_root, tmp_path, capsys):
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    line = cli_error_line(lm_args(model, text, tmp_path / "c", "--data.text_column=content"), capsys)
    assert line.endswith(f"dataset '{text}' has no column 'content'; its columns are ['text']")


def test_empty_dataset(tiny_root, tmp_path, capsys):
    model = save_model("llama", tiny_root)
    (tmp_path / "empty.txt").write_text("")
    line = cli_error_line(lm_args(model, tmp_path / "empty.txt", tmp_path / "c"), capsys)
    assert f"dataset '{tmp_path / 'empty.txt'}' is empty" in line
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    line = cli_error_line(lm_args(model, tmp_path / "blank.jsonl", tmp_path / "d"), capsys)
    assert "is empty: no row of split 'train' has text in column 'text'" in line
    # An empty activation file is the same mistake for the tensor DataModule.
    save_file({"x": torch.zeros(0, 16)}, str(tmp_path / "none.safetensors"))
    line = cli_error_line(tensor_args(tmp_path / "none.safetensors", tmp_path), capsys)
    assert "only 0 training tokens, fewer than one batch of 64" in line


def test_fewer_tokens_than_one_batch(built_cache, tmp_path, capsys):
    model, text, cache = built_cache
    line = cli_error_line(lm_args(model, text, cache, "--data.batch_size=4096"), capsys)
    assert "training rows, fewer than one batch of 4096: lower batch_size, or raise num_tokens" in line
    line = cli_error_line(tensor_args(tensor_file(tmp_path / "x.safetensors", rows=60), tmp_path), capsys)
    assert line.endswith("only 54 training tokens, fewer than one batch of 64: lower batch_size or validation_fraction, "
                         "or give more activations")


def test_cache_made_for_another_model_hook_or_dtype(built_cache, tiny_root, capsys):
    model, text, cache = built_cache
    for extra, named in [
        ([f"--data.model={save_model('neox', tiny_root)}"], "(model: cache has"),
        (["--data.hook=mlp_out"], "(roles: cache has {'x': 'layers.1'}, wanted {'x': 'layers.1.mlp_out'})"),
        (["--data.model_dtype=bfloat16"], "(model_dtype: cache has 'float32', wanted 'bfloat16')"),
        (["--data.cache_dtype=float16"], "(cache_dtype: cache has 'float32', wanted 'float16')"),
    ]:
        line = cli_error_line(lm_args(model, text, cache, *extra), capsys)
        assert f"{cache} holds activations made with other settings {named}" in line, line
        assert "Use another cache_dir" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_truncated_or_corrupt_shard(damage, built_cache, tmp_path, capsys):
    import shutil

    model, text, source = built_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    shard = cache / "shard_00002.x.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "garbage":
        shard.write_bytes(b"\x00garbage" * 64)
    else:
        shard.unlink()
    line = cli_error_line(lm_args(model, text, cache), capsys)
    said = "is missing" if damage == "missing" else "is missing, truncated or corrupt"
    assert f"the activation cache at {cache} is damaged: shard_00002.x.npy {said}" in line
    assert "data.rebuild_damaged=true to recompute only the 1 damaged shard of" in line
    assert line.endswith("or delete the cache directory and run again to rebuild it")


def test_non_finite_activations_are_refused(tiny_root, tmp_path, capsys):
    # In a file of activations:
    x = torch.randn(520, 16)
    x[7, 3], x[300, 0] = float("nan"), float("inf")
    save_file({"x": x}, str(tmp_path / "bad.safetensors"))
    line = cli_error_line(tensor_args(tmp_path / "bad.safetensors", tmp_path), capsys)
    assert line.endswith(f"tensor 'x' of {tmp_path / 'bad.safetensors'} holds NaN or inf in 2 of 520 rows (first: row 7); "
                         "SAEs cannot be trained on them: clean or regenerate the activations")
    # From a language model that overflows, before anything reaches the cache:
    broken = tmp_path / "overflowing"
    net = __import__("data_fixtures").make_model("llama")
    with torch.no_grad():
        net.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    net.save_pretrained(broken)
    __import__("data_fixtures").make_tokenizer().save_pretrained(broken)
    line = cli_error_line(lm_args(broken, write_text(tiny_root), tmp_path / "c"), capsys)
    assert "the activations 'x' of shard_00000 (row 0 first) hold NaN/inf from the model itself" in line
    assert not list((tmp_path / "c").glob("shard_*.npy"))
    # Finite activations that do not fit the cache's dtype:
    loud = tmp_path / "loud"
    net = __import__("data_fixtures").make_model("llama")
    with torch.no_grad():
        net.model.embed_tokens.weight.mul_(1e7)
    net.save_pretrained(loud)
    __import__("data_fixtures").make_tokenizer().save_pretrained(loud)
    line = cli_error_line(lm_args(loud, write_text(tiny_root), tmp_path / "d", "--data.cache_dtype=float16"), capsys)
    assert "beyond the range of cache_dtype=float16 (float16 ends at 65504; use bfloat16 or float32)" in line


def test_misspelled_config_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(tensor_args(tensor_file(tmp_path / "x.safetensors"), tmp_path, "--model.kk=4"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    # One line with the closest valid option (issue 31), not jsonargparse's dump of Union subtypes.
    assert err.strip() == ("lightning-sae: error: --model.kk is not an option of SAEModule (lightning_sae.module.SAEModule): "
                           "did you mean --model.k? (lightning-sae fit --help lists every option)")
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as stop:
        main(tensor_args(tmp_path / "x.safetensors", tmp_path, f"--config={tmp_path / 'typo.yaml'}"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "max_epoch" in err and "Traceback" not in err


def test_missing_or_damaged_checkpoint_and_init_from(tmp_path, capsys):
    data = tensor_file(tmp_path / "x.safetensors")
    line = cli_error_line(tensor_args(data, tmp_path, f"--ckpt_path={tmp_path / 'none.ckpt'}"), capsys)
    assert line.endswith(f"checkpoint not found: {tmp_path / 'none.ckpt'} (give a .ckpt file, or 'last' to resume from the newest one)")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    line = cli_error_line(tensor_args(data, tmp_path, f"--ckpt_path={tmp_path / 'cut.ckpt'}"), capsys)
    assert f"{tmp_path / 'cut.ckpt'} is not a readable checkpoint (truncated or corrupt?)" in line
    line = cli_error_line(tensor_args(data, tmp_path, f"--model.init_from={tmp_path / 'no_sae'}"), capsys)
    assert "no_sae is not a directory (expected a SAELens or sparsify SAE directory)" in line


def test_debug_environment_variable_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SAE_DEBUG", "1")
    with pytest.raises(ValueError, match="k must satisfy"):
        main(tensor_args(tensor_file(tmp_path / "x.safetensors"), tmp_path, "--model.k=0"))


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sae.cli", *tensor_args(tensor_file(tmp_path / "x.safetensors"), tmp_path, "--model.k=0")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "lightning-sae: error: k must satisfy 1 <= k <= d_sae (64), got k=0" in done.stderr


# ---- non-finite loss -------------------------------------------------------------------------------------
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    fetch = TensorDataModule._fetch
    served = {"train": 0}

    def poisoned(self, offset):
        rows_of = fetch(self, offset)
        if offset:  # the validation rows stay clean
            return rows_of

        def get(rows):
            batch = rows_of(rows)
            served["train"] += 1
            if served["train"] == 8:  # global step 7 (the 8th batch)
                batch["x"] = batch["x"].clone()
                batch["x"][3, 2] = float("nan")
            return batch

        return get

    monkeypatch.setattr(TensorDataModule, "_fetch", poisoned)
    ckpts = tmp_path / "ckpt"
    args = tensor_args(
        tensor_file(tmp_path / "x.safetensors", rows=1200), tmp_path, "--trainer.max_epochs=2",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={ckpts}",
        "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_on_exception=true",
    )
    line = cli_error_line(args, capsys, status=1)
    assert "training stopped: the loss was nan at global step 7 (epoch 0, batch 7)" in line
    assert "The batch itself holds NaN/inf in ['x']" in line and "none was written after it" in line
    steps = sorted(int(p.stem.split("step=")[1]) for p in ckpts.glob("epoch=*.ckpt"))
    assert steps == [2, 4, 6]  # step 8 would have held the weights the NaN step spoiled
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    for path in ckpts.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point()), path
    assert not (tmp_path / "sae").exists()  # no SAE was exported from the spoiled weights


class _Diverging(SAEModule):
    def training_loss(self, batch):
        loss = super().training_loss(batch)
        return loss * float("inf") if self.global_step == 3 else loss


def test_guard_tells_divergence_from_bad_data_and_checks_weights_before_saving(tmp_path):
    data = TensorDataModule(path=str(tensor_file(tmp_path / "x.safetensors")), batch_size=64)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[NonFiniteGuard(1)])
    with pytest.raises(NonFiniteLossError, match=r"the loss was inf at global step 3 \(epoch 0, batch 3\)\. Its batch was finite "
                                                 r"and in the range of the data seen before, so the optimisation diverged"):
        trainer.fit(_Diverging(k=4, d_sae=64, lr=1e-3), data)
    # Weights spoiled without a non-finite loss (yet) are caught when a checkpoint is about to be written.
    module = SAEModule(k=4, d_sae=64, widths={"x": 16})
    guard = NonFiniteGuard()
    with torch.no_grad():
        module.sae.W_dec[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"the weights \['sae.W_dec'\] hold NaN/inf, so no checkpoint was written"):
        guard.on_save_checkpoint(trainer, module, {})
    # Under DDP the ranks agree before anyone stops, so no rank is left waiting in a collective.
    votes = []
    trainer.strategy.reduce_boolean_decision = lambda local, all=True: votes.append((local, all)) or True
    with pytest.raises(NonFiniteLossError, match="another rank had a NaN or infinite loss"):
        NonFiniteGuard().check(trainer, module)
    assert votes == [(False, False)]


# ---- safe loading ----------------------------------------------------------------------------------------
class _Payload:
    """Pickles as a call to os.system: unpickling this object runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    state = SAEModule(k=4, d_sae=64, widths={"x": 16}).state_dict()
    torch.save({"state_dict": state, "hyper_parameters": {"k": 4}, "payload": _Payload(marker)}, path)
    return path


def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    evil = _malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    # Even with torch's default flipped to unsafe loading by the environment:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    data = tensor_file(tmp_path / "x.safetensors")

    for option in ("--ckpt_path", "--model.init_from"):
        line = cli_error_line(tensor_args(data, tmp_path, f"{option}={evil}"), capsys)
        assert f"refusing to load {evil}: it is not a plain weights checkpoint" in line, line
        assert "posix.system" in line or "os.system" in line or "nt.system" in line
        assert "weights_only=False" not in line  # never advise the unsafe way round
        assert not marker.exists()

    assert export_main([str(evil), str(tmp_path / "out"), "--format", "saelens"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not marker.exists()

    # Lightning's own resume path, outside the CLI, with the CheckpointIO the CLI installs.
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.fit(SAEModule(k=4, d_sae=64), TensorDataModule(path=str(data), batch_size=64), ckpt_path=evil)
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_library():
    for path in [*(REPO / "lightning_sae").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"
            assert "pickle.load(" not in line and "allow_pickle=True" not in line, f"{path}:{number}"


# ---- atomic checkpoint files -------------------------------------------------------------------------------
def test_the_cli_writes_checkpoints_through_a_temporary_name(tmp_path):
    cli = main(tensor_args(tensor_file(tmp_path / "x.safetensors"), tmp_path, "--trainer.max_steps=1",
                           "--trainer.limit_val_batches=0"))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, NonFiniteGuard) for c in cli.trainer.callbacks)
    checkpoints = list(Path(tmp_path).rglob("*.ckpt"))
    assert checkpoints and not list(Path(tmp_path).rglob(".*.tmp"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    real_save = torch.save

    def dies_halfway(obj, handle):
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(checkpoint_io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert io.load_checkpoint(target)["step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
    io.save_checkpoint({"step": 3}, target)
    assert io.load_checkpoint(target)["step"] == 3


# ---- memory over many epochs of a memory-mapped cache ---------------------------------------------------------
def _memory() -> dict[str, int]:
    """Resident memory (KiB): all, anonymous (the heap: where a leak shows) and file-backed (the
    cache's mapped pages, which the kernel may keep or drop), plus open file descriptors."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    fields["fds"] = len(os.listdir("/proc/self/fd"))
    return fields


def _cache_datamodule(tiny_root, cache: Path, num_tokens: int, shard_tokens: int, batch_size: int):
    from data_fixtures import datamodule

    text = write_text(tiny_root, count=num_tokens // 8, name=f"corpus_{num_tokens}.txt")
    dm = datamodule(save_model("llama", tiny_root), text, cache, SAEModule().data_request(), context_size=64,
                    num_tokens=num_tokens, shard_tokens=shard_tokens, model_batch_size=32, batch_size=batch_size,
                    validation_fraction=0.01)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _assert_flat(first: dict[str, int], last: dict[str, int], cache: Path, heap_kib: int) -> None:
    cache_kib = sum(p.stat().st_size for p in cache.glob("*.npy")) // 1024
    assert last["RssAnon"] - first["RssAnon"] < heap_kib, (first, last)
    assert last["RssFile"] - first["RssFile"] < cache_kib + 1024, (first, last)  # at most the cache itself
    assert last["fds"] <= first["fds"], (first, last)  # evicted maps are closed


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_memory_stays_flat_over_many_epochs_of_a_memory_mapped_cache(tiny_root, tmp_path):
    # 13 shards, at most 4 mapped at once: every batch opens and closes maps, the likeliest leak.
    dm = _cache_datamodule(tiny_root, tmp_path / "cache", num_tokens=64 * 400, shard_tokens=2048, batch_size=1024)
    dm._readers["train"].max_open = 4
    loader = dm.train_dataloader()
    readings = []
    for _ in range(30):
        for batch in loader:
            batch["x"].sum()  # use the rows as a training step would
        readings.append(_memory())
    assert len(dm._readers["train"]._open) == 4
    print(f"\nmemory after epochs 2 and 30: {readings[1]} -> {readings[-1]}")
    _assert_flat(readings[1], readings[-1], tmp_path / "cache", heap_kib=1024)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_memory_stays_flat_over_a_long_fit_on_a_memory_mapped_cache(tiny_root, tmp_path):
    """A real Trainer fit: 30 epochs over a ~26 MB cache of 100 shards (more than the 64 the reader
    keeps mapped). Run with `pytest -m slow`.

    The heap grows for the first ~150 optimizer steps whatever the data source (the allocators
    settling; a TensorDataModule shows the same), then stays put; so the comparison starts at
    epoch 10 (240 steps)."""

    class Recorder(L.Callback):
        def __init__(self):
            self.readings = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.readings.append(_memory())

    dm = _cache_datamodule(tiny_root, tmp_path / "cache", num_tokens=64 * 3200, shard_tokens=2048, batch_size=8192)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])
    trainer.fit(SAEModule(k=4, d_sae=64, lr=1e-3, spliced_eval_contexts=0), datamodule=dm)
    print("\nRssAnon KiB per epoch:", [r["RssAnon"] for r in recorder.readings])
    print(f"memory after epochs 10 and 30: {recorder.readings[9]} -> {recorder.readings[-1]}")
    _assert_flat(recorder.readings[9], recorder.readings[-1], tmp_path / "cache", heap_kib=2048)
