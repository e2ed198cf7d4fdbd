"""Small builders shared by the core tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_sae.cli import main

from lightning_sae.module import SAEModule
from lightning_sae.sae import TopKSAE


def dense_reference(params: dict[str, Tensor], x: Tensor, k: int) -> Tensor:
    """The SPEC's TopK SAE written densely, for autograd to differentiate."""
    pre = torch.relu((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
    indices = pre.topk(k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices))
    return z @ params["W_dec"] + params["b_dec"]


def module_with_width(d_in: int, **kwargs) -> SAEModule:
    return SAEModule(widths={"x": d_in}, **kwargs)


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32, perturb_decoder: bool = False) -> TopKSAE:
    """A TopK SAE with random encoder and biases; `perturb_decoder` also moves the decoder rows off
    unit norm, so that no test passes by an accidental symmetry between encoder and decoder."""
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k, seed=seed)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if perturb_decoder:
            sae.W_dec.add_(0.1 * torch.randn_like(sae.W_dec))
    return sae.to(dtype)


def cli_error_line(args: list[str], capsys, status: int = 2, prefix: str = "lightning-sae: error: ") -> str:
    """Runs the CLI in-process expecting exit `status` without a traceback; returns its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def checkpointed_fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    """`lightning-sae fit` of a small SAE (k 4, 64 latents) on a TensorDataModule file: 3 epochs on
    CPU, a checkpoint every 5 steps in root/ckpt; `extra` adds arguments (a selector, --ckpt_path)."""
    return [
        "fit", "--seed_everything=0", "--model=sae", "--model.k=4", "--model.d_sae=64",
        "--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={data}", "--data.batch_size=64",
        "--data.validation_fraction=0.1", "--data.num_workers=0",
        "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.save_top_k=-1", *extra,
    ]


def newest_checkpoint_step(folder: Path) -> int:
    """The optimizer step of the newest `epoch=E-step=S.ckpt` in `folder`, -1 without one."""
    steps = [int(p.stem.split("step=")[1]) for p in folder.glob("epoch=*-step=*.ckpt")]
    return max(steps, default=-1)


@contextmanager
def fit_in_subprocess(args: list[str], repo: Path, **environment: str) -> Iterator[subprocess.Popen]:
    """`lightning-sae ARGS` in a child process (tests/ importable, for callbacks such as
    test_resume.Throttle; `environment` added); it is killed and reaped on the way out, whatever
    happened."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")]), **environment}
    process = subprocess.Popen([sys.executable, "-m", "lightning_sae.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


def sigkill_at_checkpoint(process: subprocess.Popen, checkpoints: Path, step: int, timeout: float = 300) -> int:
    """Waits until the fit in `process` has written a checkpoint at optimizer step `step` or
    later, kills it with SIGKILL (no chance to save anything more) and returns the newest
    checkpoint's step."""
    deadline = time.monotonic() + timeout
    while newest_checkpoint_step(checkpoints) < step and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    return newest_checkpoint_step(checkpoints)
