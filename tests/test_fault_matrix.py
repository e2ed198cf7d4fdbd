"""The fault trial of issue 28, replayed: each fault a careful user met, with the exit status,
the one error line and, for bad data, that no training step ran on it.

| fault                                              | exit | says                                          |
|----------------------------------------------------|------|-----------------------------------------------|
| a flipped bit in a shard (default verify)          | 2    | the shard's file does not match its hash      |
| a shard (+ tokens) copied in from another cache    | 2    | the same, for each swapped file               |
| rows of 3e38 written into a shard (default)        | 2    | the same                                      |
| rows of 3e38 with verify: header (opt-out)         | 1    | the data is far out of range, not the lr      |
| NaN in the validation shard with verify: header    | 2    | NaN/inf in row r of shard_00000.x.npy         |
| lr < 0, lr nan                                     | 2    | lr must be a finite number >= 0               |
| init_from a 64-latent SAE with d_sae 128 (or k)    | 2    | both values                                   |
| context_size above the model's positions           | 2    | the model's limit                             |
| unknown selector, misspelled option                | 2    | the registered names / the closest option     |
| a full disk while caching (tmpfs, or ENOSPC)       | 2    | cache_dir, bytes needed and free; rerun resumes |
| a second writer of the same cache                  | 2    | the holder's PID                              |
| SIGTERM while caching                              | 143  | where it stopped; a rerun resumes             |
| one DDP rank dies                                  | 1    | the lost rank and --ckpt_path=last            |

Every case shares one small cache (module-scoped) and copies it when it damages it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401
    _isolated_caches,
    datamodule,
    save_model,
    tiny_root,
    write_text,
)
from cache_fixtures import QUIET, REPO, SETTINGS, built, data_offset, fit_args, steps  # noqa: F401
from helpers import cli_error_line
from safetensors.torch import save_file

from lightning_sae.cli import main
from lightning_sae.data import cache
from lightning_sae.data.cache import read_manifest
from lightning_sae.formats import save_saelens
from lightning_sae.module import SAEModule
from lightning_sae.sae import TopKSAE



def tensor_args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--model=sae", "--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={data}",
        "--data.batch_size=64", "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={root}", *QUIET, *extra,
    ]




@pytest.fixture
def copied(built, tmp_path) -> tuple[Path, Path, Path]:
    model, text, source = built
    shutil.copytree(source, tmp_path / "cache")
    return model, text, tmp_path / "cache"



# ---- damaged data: found by default, before any step trains on it ---------------------------------------
def test_the_intact_copy_trains_with_the_default_verification(copied, steps):
    model, text, cache_dir = copied
    main(fit_args(model, text, cache_dir))
    assert steps == [0]


def test_a_flipped_bit_is_found_by_default(copied, steps, capsys):
    model, text, cache_dir = copied
    shard = cache_dir / "shard_00002.x.npy"
    data = bytearray(shard.read_bytes())
    data[data_offset(shard) + 1000] ^= 0x04  # one mantissa bit: finite, plausible, wrong
    shard.write_bytes(bytes(data))
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert line == (f"lightning-sae: error: the activation cache at {cache_dir} is damaged: shard_00002.x.npy does not "
                    "match its recorded content hash (its bytes changed after it was written). Set "
                    "data.rebuild_damaged=true to recompute only the 1 damaged shard of 6, or delete the cache directory "
                    "and run again to rebuild it")
    assert steps == []


@pytest.mark.parametrize("with_tokens", [False, True])
def test_a_shard_copied_in_from_another_cache_is_found_by_default(with_tokens, copied, tmp_path, steps, capsys):
    # Another cache of the same model and text with other rows in its shard 2 (its shard 3's, by
    # construction), so the copy has the right shapes and passes every header check.
    model, text, cache_dir = copied
    other = tmp_path / "other"
    shutil.copytree(cache_dir, other)
    for key in ["x", "tokens"] if with_tokens else ["x"]:
        shutil.copy(other / f"shard_00003.{key}.npy", other / f"shard_00002.{key}.npy")
        shutil.copy(other / f"shard_00002.{key}.npy", cache_dir / f"shard_00002.{key}.npy")
    assert cache.check_shards(cache_dir, read_manifest(cache_dir), "header") == {}  # headers cannot tell
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert f"the activation cache at {cache_dir} is damaged: shard_00002.x.npy does not match its recorded content hash" in line
    assert steps == []


def _write_absurd_rows(cache_dir: Path) -> None:
    values = np.load(cache_dir / "shard_00001.x.npy", mmap_mode="r+")
    values[:] = np.float32(3e38)  # finite, but its square is inf: every row of the shard
    values.flush()


def test_absurd_rows_are_found_by_default(copied, steps, capsys):
    model, text, cache_dir = copied
    _write_absurd_rows(cache_dir)
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert "shard_00001.x.npy does not match its recorded content hash" in line
    assert steps == []


def test_absurd_rows_with_header_checks_only_are_blamed_on_the_data(copied, capsys):
    # The opt-out: header checks cannot see finite values; the loss goes inf at the first step,
    # and the guard says the data is out of range rather than "lower the learning rate".
    model, text, cache_dir = copied
    _write_absurd_rows(cache_dir)
    line = cli_error_line(fit_args(model, text, cache_dir, "--data.verify=header", "--trainer.max_steps=5",
                                   "--non_finite_guard.check_every_n_steps=1"), capsys, status=1)
    assert "Its batch was finite but far out of the range of the data seen so far: its largest value, 3e+38, is so " \
           "large that its square overflows float32. The data is at fault, not the optimisation" in line
    assert "lower the learning rate" not in line


def test_nan_in_the_validation_shard_names_shard_and_row(copied, steps, capsys):
    model, text, cache_dir = copied
    values = np.load(cache_dir / "shard_00000.x.npy", mmap_mode="r+")
    values[5, 3] = np.float32("nan")
    values.flush()
    del values
    args = fit_args(model, text, cache_dir, "--data.verify=header", "--trainer.limit_val_batches=1")
    line = cli_error_line(args, capsys)
    assert line.startswith(f"lightning-sae: error: the activation cache at {cache_dir} holds NaN/inf in row 5 of "
                           "shard_00000.x.npy, which caching never writes")
    assert steps == []  # the sanity check's validation batch came first
    line = cli_error_line(fit_args(model, text, cache_dir, "--trainer.limit_val_batches=1"), capsys)  # the default
    assert "shard_00000.x.npy does not match its recorded content hash (its bytes changed after it was written); " \
           "row 5 now holds NaN/inf" in line


# ---- settings checked before anything runs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("activations") / "x.safetensors"
    save_file({"x": torch.randn(520, 16, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def test_a_learning_rate_that_cannot_train(activations, tmp_path, steps, capsys):
    line = cli_error_line(tensor_args(activations, tmp_path, "--model.k=4", "--model.d_sae=64", "--model.lr=-0.001"), capsys)
    assert line.endswith("lr must be a finite number >= 0 (None: the default 2e-4 / sqrt(d_sae / 2^14)), got lr=-0.001")
    assert steps == []
    for lr in (float("nan"), float("inf")):  # the command line refuses these as floats already; Python does not
        with pytest.raises(ValueError, match=f"lr must be a finite number >= 0 .*got lr={lr}"):
            SAEModule(lr=lr)


@pytest.mark.parametrize(("given", "said"), [
    (["--model.d_sae=128"], "d_sae=128 (the SAE has d_sae=64)"),
    (["--model.k=8"], "k=8 (the SAE has k=4)"),
    (["--model.d_sae=128", "--model.k=8"], "d_sae=128 (the SAE has d_sae=64), k=8 (the SAE has k=4)"),
])
def test_settings_that_disagree_with_init_from(given, said, activations, tmp_path, steps, capsys):
    torch.manual_seed(0)
    sae = save_saelens(TopKSAE(16, 64, 4), tmp_path / "sae")
    line = cli_error_line(tensor_args(activations, tmp_path, f"--model.init_from={sae}", *given), capsys)
    assert f"model settings disagree with the SAE at {sae}: {said}; leave" in line
    assert steps == []


def test_init_from_alone_takes_the_saved_shape(activations, tmp_path, steps):
    torch.manual_seed(0)
    sae = save_saelens(TopKSAE(16, 64, 4), tmp_path / "sae")
    cli = main(tensor_args(activations, tmp_path, f"--model.init_from={sae}"))
    assert steps == [0] and (cli.model.hparams.d_sae, cli.model.hparams.k) == (64, 4)


def test_context_size_above_the_models_positions(tiny_root, tmp_path, capsys):
    model, text = save_model("gpt2", tiny_root), write_text(tiny_root)  # learned positions: 128 of them
    args = fit_args(model, text, tmp_path / "c", "--data.context_size=256", "--data.num_tokens=2560")
    line = cli_error_line(args, capsys)
    assert line.endswith(f"context_size 256 is more than the 128 positions {model} takes (its config's "
                         "max_position_embeddings): set data.context_size to 128 or less")
    assert not (tmp_path / "c").exists()  # before any model pass


def test_unknown_selector_and_misspelled_option(activations, tmp_path, capsys):
    line = cli_error_line(tensor_args(activations, tmp_path, "--model.selector=topkk"), capsys)
    assert line.startswith("lightning-sae: error: --model.selector=topkk: no selector is registered under that name; "
                           "did you mean 'topk'? The registered selectors are ")
    from lightning_sae.registry import SELECTORS, load_plugins

    assert ", ".join(sorted(load_plugins(SELECTORS))) in line  # every registered name, sorted
    line = cli_error_line(tensor_args(activations, tmp_path, "--model.kk=3"), capsys)
    assert line.startswith("lightning-sae: error: --model.kk is not an option of SAEModule (lightning_sae.module.SAEModule): "
                           "did you mean --model.k?")
    line = cli_error_line(tensor_args(activations, tmp_path, "--model=saee"), capsys)
    assert "--model=saee: no variant is registered under that name; did you mean 'sae'?" in line


# ---- the cache's writers: a full disk, two at once, SIGTERM ------------------------------------------------
def test_a_full_disk_is_one_line_and_a_rerun_resumes(built, tmp_path, steps, monkeypatch, capsys):
    model, text, _ = built
    cache_dir = tmp_path / "cache"
    real = os.posix_fallocate
    calls = []

    def full_from_the_third_shard(fd, offset, length):
        calls.append(length)
        if len(calls) >= 3:  # one file per shard (x): the third shard finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(cache.os, "posix_fallocate", full_from_the_third_shard)
    line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    free = shutil.disk_usage(cache_dir).free
    assert line.startswith(f"lightning-sae: error: no space left for the activation cache at {cache_dir}: shard shard_00002 "
                           "needs ")
    assert f"and its filesystem has {cache._size(free)[:-4]}" in line  # the free space measured then (to 3 digits)
    assert line.endswith("the 2 complete shards are kept and caching resumes at shard_00002")
    assert steps == [] and not list(cache_dir.glob(".*.tmp"))  # the reserved space was given back
    assert [s["file"] for s in read_manifest(cache_dir)["shards"]] == ["shard_00000", "shard_00001"]
    monkeypatch.setattr(cache.os, "posix_fallocate", real)
    main(fit_args(model, text, cache_dir))
    assert steps == [0] and cache.check_shards(cache_dir, read_manifest(cache_dir), "full") == {}


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    mount = "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


@pytest.mark.slow  # two CLI runs in subprocesses (~75 s on a loaded 2-core machine); the test above covers CI
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (a user and mount namespace) to mount a small tmpfs")
def test_a_real_full_filesystem(built, tmp_path):
    # A 48 kB tmpfs (in a private mount namespace: no root needed) fills up a few shards in; the
    # memory-mapped writes would have been a SIGBUS. Remounted larger, the same command resumes.
    model, text, _ = built
    cache_dir = tmp_path / "small"
    cache_dir.mkdir()
    command = [sys.executable, "-m", "lightning_sae.cli", *fit_args(model, text, cache_dir)]
    quoted = " ".join(f"'{part}'" for part in command)
    script = (f"mount -t tmpfs -o size=48k tmpfs '{cache_dir}' && {quoted} 2>'{tmp_path}/first.err'; echo $? > '{tmp_path}/first.rc'; "
              f"ls '{cache_dir}' > '{tmp_path}/first.ls'; mount -o remount,size=4m '{cache_dir}' && {quoted} "
              f"> '{tmp_path}/second.out' 2>&1; echo $? > '{tmp_path}/second.rc'")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=600, check=False)
    first = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first[-3000:]
    lines = [line for line in first.splitlines() if line.startswith("lightning-sae: error: ")]
    assert len(lines) == 1 and "Traceback" not in first, first[-3000:]
    assert lines[0].startswith(f"lightning-sae: error: no space left for the activation cache at {cache_dir}: shard ")
    assert "complete shards are kept and caching resumes at" in lines[0]
    assert not [name for name in (tmp_path / "first.ls").read_text().split() if name.endswith(".tmp")]
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second[-3000:]
    assert "lightning-sae: cached" in second  # only the shards the first run could not write


def test_a_second_writer_is_refused_naming_the_holder(built, tmp_path, steps, capsys):
    model, text, _ = built
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with cache.writer_lock(cache_dir):  # this process plays the first fit, still writing
        line = cli_error_line(fit_args(model, text, cache_dir), capsys)
    assert line.startswith(f"lightning-sae: error: the activation cache at {cache_dir} is being written by another process "
                           f"(PID {os.getpid()}, holding .lock): let it finish and run again")
    assert steps == [] and read_manifest(cache_dir) is None
    main(fit_args(model, text, cache_dir))  # the lock went with its holder
    assert steps == [0]


def test_sigterm_while_caching_says_where_it_stopped_and_a_rerun_resumes(tiny_root, tmp_path, steps, capsys):
    model, text = save_model("llama", tiny_root), write_text(tiny_root, count=600, name="longer.txt")
    cache_dir = tmp_path / "cache"
    # model_dtype pinned: the subprocess has no conftest making "auto" float32 on a CPU with fast bf16
    args = fit_args(model, text, cache_dir, "--data.num_tokens=5120", "--data.model_dtype=float32")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # The first two shards are written (0.2 s each); from the third on each waits up to 60 s first, so the
    # signal, sent once two are on disk, always lands while it caches, however fast the machine.
    slowed = ("import itertools, sys, time; from lightning_sae.data import cache; write = cache._write_shard; "
              "count = itertools.count(); "
              "cache._write_shard = lambda *a, **k: (time.sleep(0.2 if next(count) < 2 else 60), write(*a, **k))[1]; "
              "from lightning_sae.cli import main; main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slowed, *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        manifest = cache_dir / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("lightning-sae: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    kept = read_manifest(cache_dir)["shards"]
    stem, total = f"shard_{len(kept):05d}", len(cache.shard_plan(16, 304, 8))  # 320 contexts, 5% held out
    assert lines[0] == (f"lightning-sae: error: caching stopped by SIGTERM at shard {stem} of the activation cache at "
                        f"{cache_dir} ({len(kept)} of {total} shards complete and kept): run the same command again to "
                        f"resume at {stem}")
    assert not read_manifest(cache_dir)["complete"] and not list(cache_dir.glob(".*.tmp"))
    main(args)
    assert steps == [0] and read_manifest(cache_dir)["complete"]
    assert read_manifest(cache_dir)["shards"][: len(kept)] == kept  # kept as they were, the rest added
    resumed = sum(shard["contexts"] for shard in read_manifest(cache_dir)["shards"][len(kept):]) * 16
    assert f"lightning-sae: cached {resumed:,} tokens" in capsys.readouterr().out


# ---- distributed: a rank dies ---------------------------------------------------------------------------
def test_when_a_rank_dies_the_survivor_names_it_and_how_to_resume(activations, tmp_path):
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))}, str(data))
    args = [*tensor_args(data, tmp_path, "--model.k=4", "--model.d_sae=64"), "--trainer.max_steps=20",
            "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.callbacks+=fault_callbacks.DieOnRank",
            "--trainer.callbacks.rank=1", "--trainer.callbacks.step=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_sae.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("lightning-sae: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("lightning-sae: error: rank 1 of 2 stopped during the run (at about global step 2), so "
                               "rank 0 cannot go on without it")
    assert lines[0].endswith("Resume every rank from the last checkpoint with --ckpt_path=last")



def test_finite_rows_far_beyond_those_seen_are_blamed_on_the_data(activations, tmp_path, monkeypatch, capsys):
    # Rows of 1e18 at step 4: their squares sum past float32 (an inf loss) although no single
    # square overflows; they are ~1e17 times the largest value of the four batches before.
    from lightning_sae.tensor_data import TensorDataModule

    fetch, served, largest = TensorDataModule._fetch, {"train": 0}, []

    def poisoned(self, offset):
        rows_of = fetch(self, offset)
        if offset:
            return rows_of

        def get(rows):
            batch = rows_of(rows)
            served["train"] += 1
            if served["train"] == 5:
                batch["x"] = torch.full_like(batch["x"], 1e18)
            else:
                largest.append(float(batch["x"].abs().max()))
            return batch

        return get

    monkeypatch.setattr(TensorDataModule, "_fetch", poisoned)
    line = cli_error_line(tensor_args(activations, tmp_path, "--model.k=4", "--model.d_sae=64", "--trainer.max_steps=8",
                                      "--non_finite_guard.check_every_n_steps=1"), capsys, status=1)
    seen = max(largest[:4])  # the batches of steps 0-3 (the loader may have fetched more by then)
    assert "the loss was inf at global step 4" in line
    assert (f"Its batch was finite but far out of the range of the data seen so far: its largest value, 1e+18, is "
            f"{1e18 / seen:.3g} times the largest of the 4 batches before it ({seen:.3g})") in line
