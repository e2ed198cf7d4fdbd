"""Interrupted fits (issue 8): a run stopped part-way, by SIGTERM or SIGKILL, resumes from its last
checkpoint to the same final weights as a run that was never stopped.

The reference run and every resumed run happen in this process; the runs that get killed are real
`python -m lightning_sae.cli fit` processes, slowed by `Throttle` so the signal lands mid-training,
after a checkpoint exists but at no chosen point (possibly in the middle of writing one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from helpers import fit_in_subprocess, newest_checkpoint_step, sigkill_at_checkpoint
from lightning_sae.cli import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 28  # 4 epochs of 7 batches: 520 rows, 52 held out, batches of 64


class Throttle(L.Callback):
    """Sleeps after every training batch (used by the runs that get killed)."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def tensor_data(path: Path) -> list[str]:
    return ["--data=lightning_sae.tensor_data.TensorDataModule", f"--data.path={path}", "--data.batch_size=64",
            "--data.validation_fraction=0.1", "--data.num_workers=0"]


def fit_args(data: Path | list[str], root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything=0", "--model=sae", "--model.k=4", "--model.d_sae=64", "--model.dead_tokens=300",
        *(data if isinstance(data, list) else tensor_data(data)),
        "--trainer.max_epochs=4", "--trainer.accelerator=cpu", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.save_last=true", *extra,
    ]


def final_state(cli) -> dict:
    state = cli.model.state_dict()
    assert cli.trainer.global_step == STEPS
    return state


def assert_same_training_state(resumed: dict, reference: dict, exact: bool = True) -> None:
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        if not torch.is_tensor(value):  # extra state: the dead-latent tracker's tokens_seen
            assert resumed[name] == value, name
        elif exact or not value.is_floating_point():
            assert torch.equal(resumed[name], value), name
        else:
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    assert bool(reference["b_dec_initialized"]) and reference["sae_activity._extra_state"]["tokens_seen"] == STEPS * 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "x.safetensors"
    save_file({"x": torch.randn(520, 16, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run: its final state and its checkpoint folder (one every 3 steps)."""
    root = tmp_path_factory.mktemp("reference")
    return final_state(main(fit_args(data, root))), root / "ckpt"


@pytest.mark.parametrize("checkpoint", ["epoch=1-step=9.ckpt", "epoch=2-step=21.ckpt"], ids=["mid_epoch", "epoch_end"])
def test_resuming_from_any_checkpoint_reaches_the_same_weights(checkpoint, reference, data, tmp_path):
    state, checkpoints = reference
    saved = torch.load(checkpoints / checkpoint, weights_only=True)
    # The position in the data travels in the DataModule's state (see LoaderPosition).
    position = saved["TensorDataModule"]["train_loader"]
    assert position == ({"epoch": 1, "batches_done": 2} if "step=9" in checkpoint else {"epoch": 2, "batches_done": 7})
    resumed = main(fit_args(data, tmp_path, f"--ckpt_path={checkpoints / checkpoint}"))
    assert_same_training_state(final_state(resumed), state)


# ---- real processes, really killed -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Starts one fit per signal (side by side, to share the start-up time), sends the signal once
    the fit has written a checkpoint at step 6 or later; returns {signal: (status, stderr, root)}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    runs = {}
    for name in ("SIGTERM", "SIGKILL"):
        root = tmp_path_factory.mktemp(name.lower())
        args = fit_args(data, root, "--trainer.callbacks+=test_resume.Throttle", "--trainer.callbacks.seconds=0.1")
        stderr = open(root / "stderr.txt", "w+")
        process = subprocess.Popen([sys.executable, "-m", "lightning_sae.cli", *args], env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        runs[name] = (process, stderr, root)
    results = {}
    try:
        deadline = time.monotonic() + 300
        pending = dict(runs)
        while pending and time.monotonic() < deadline:
            for name, (process, stderr, root) in list(pending.items()):
                assert process.poll() is None, f"the {name} run ended before it was killed"
                if newest_checkpoint_step(root / "ckpt") >= 6:
                    process.send_signal(getattr(signal, name))
                    del pending[name]
            time.sleep(0.05)
        assert not pending, f"no checkpoint appeared in time: {sorted(pending)}"
        for name, (process, stderr, root) in runs.items():
            status = process.wait(timeout=120)
            stderr.seek(0)
            results[name] = (status, stderr.read(), root)
    finally:
        for process, stderr, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr.close()
    return results


@pytest.mark.parametrize("name", ["SIGTERM", "SIGKILL"])
def test_a_killed_fit_resumes_to_the_same_weights(name, killed, reference, data):
    status, stderr, root = killed[name]
    if name == "SIGTERM":  # Lightning stops after the batch under way; the command says how to go on
        assert status == 128 + signal.SIGTERM, stderr[-3000:]
        assert "lightning-sae: stopped by SIGTERM; resume from the last checkpoint with --ckpt_path=last" in stderr
        assert "Traceback" not in stderr
    else:
        assert status == -signal.SIGKILL
    # Whatever moment the signal hit, every checkpoint file there is whole.
    for path in (root / "ckpt").glob("*.ckpt"):
        torch.load(path, weights_only=True)
    stopped_at = newest_checkpoint_step(root / "ckpt")
    assert stopped_at < STEPS  # it really was stopped part-way
    resumed_from = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    resumed = main(fit_args(data, root, "--ckpt_path=last"))
    state, _ = reference
    final = final_state(resumed)
    differences = [(final[k] - v).abs().max().item() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    print(f"\n{name}: stopped after the checkpoint of step {stopped_at}, resumed from step {resumed_from}, "
          f"largest weight difference to the uninterrupted run {max(differences)}")
    # Bit-identical in practice; the tolerance only allows for the killed run having been another
    # process (thread scheduling could change float summation order).
    assert_same_training_state(final, state, exact=False)


# ---- the same through the activation cache, and with loader workers -----------------------------------------
def test_a_fit_on_the_activation_cache_resumes_mid_epoch_to_the_same_weights(tmp_path_factory, capsys):
    from data_fixtures import save_model, write_text

    tiny = tmp_path_factory.mktemp("tiny_lm")
    cache = tiny / "cache"
    lm = [
        "--data=lightning_sae.data.ActivationDataModule", f"--data.model={save_model('gpt2', tiny)}",
        f"--data.dataset={write_text(tiny)}", "--data.layer=1", "--data.context_size=16", "--data.num_tokens=960",
        "--data.shard_tokens=256", "--data.batch_size=64", "--data.device=cpu", "--data.model_dtype=float32", f"--data.cache_dir={cache}",
        "--data.validation_fraction=0.1",
    ]

    def run(root: Path, *extra: str):
        return main(fit_args(lm, root, "--trainer.max_epochs=2", "--model.spliced_eval_contexts=0", *extra))

    reference = run(tmp_path_factory.mktemp("lm_reference"))
    steps = reference.trainer.global_step  # 2 epochs of 12 batches
    checkpoint = reference.trainer.default_root_dir + "/ckpt/epoch=1-step=15.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["ActivationDataModule"]["train_loader"] == {"epoch": 1, "batches_done": 15 - steps // 2}
    resumed = run(tmp_path_factory.mktemp("lm_resumed"), f"--ckpt_path={checkpoint}")
    assert resumed.trainer.global_step == steps
    for name, value in reference.model.state_dict().items():
        assert (torch.equal(resumed.model.state_dict()[name], value) if torch.is_tensor(value)
                else resumed.model.state_dict()[name] == value), name
    # The checkpoint names its data; resumed on other data (the model run in bfloat16 caches other
    # activations) it is refused instead of carrying its optimizer and loader place over.
    assert len(saved["ActivationDataModule"]["data_identity"]) == 16
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(tmp_path_factory.mktemp("lm_other"), f"--ckpt_path={checkpoint}", "--data.model_dtype=bfloat16",
            f"--data.cache_dir={tiny / 'cache_bf16'}")
    assert "the checkpoint being resumed was trained on other data than this DataModule serves" in capsys.readouterr().err
    # validating it on other data is what `validate` is for
    other = fit_args(lm, tmp_path_factory.mktemp("lm_validate"), "--model.spliced_eval_contexts=0", f"--ckpt_path={checkpoint}",
                     "--data.model_dtype=bfloat16", f"--data.cache_dir={tiny / 'cache_bf16'}")
    validated = main(["validate", *other[1:]])
    assert 0 < validated.trainer.callback_metrics["val/explained_variance"] <= 1


def test_a_loader_with_workers_resumes_at_the_same_batch(data):
    from lightning_sae.tensor_data import TensorDataModule

    def loader(workers: int):
        dm = TensorDataModule(path=str(data), batch_size=32, validation_fraction=0.1, num_workers=workers)
        dm.setup("fit")
        return dm.train_dataloader()

    single = loader(0)
    epochs = [list(single), list(single)]
    assert not torch.equal(epochs[0][0]["x"], epochs[1][0]["x"])  # each pass is a new epoch
    resumed = loader(2)
    resumed.load_state_dict({"epoch": 1, "batches_done": 5})
    rest = list(resumed)
    assert len(rest) == len(epochs[1]) - 5
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(rest, epochs[1][5:]))
    assert resumed.state_dict() == {"epoch": 1, "batches_done": len(epochs[1])}
    # A state saved after an epoch's last batch resumes with the next epoch.
    single.load_state_dict(resumed.state_dict())
    assert torch.equal(next(iter(single))["x"], next(iter(resumed))["x"])
    assert resumed.state_dict() == {"epoch": 2, "batches_done": 1}


# ---- a streaming fit: killed, resumed, the same weights ------------------------------------------------------
def _stream_args(tiny: Path, root: Path, *extra: str) -> list[str]:
    from data_fixtures import save_model, write_text

    lm = [
        "--data=lightning_sae.data.ActivationDataModule", f"--data.model={save_model('gpt2', tiny)}",
        f"--data.dataset={write_text(tiny)}", "--data.layer=1", "--data.context_size=16", "--data.num_tokens=640",
        "--data.source=stream", "--data.buffer_tokens=96", "--data.batch_size=64", "--data.model_batch_size=4",
        "--data.device=cpu", "--data.model_dtype=float32", "--data.validation_fraction=0.1",
    ]
    return fit_args(lm, root, "--trainer.max_epochs=3", "--model.spliced_eval_contexts=0",
                    "--model.selector=gradient_topk", *extra)


def test_a_killed_streaming_fit_resumes_to_the_same_weights(tmp_path_factory):
    """36 training contexts of 15 rows give 8 batches of 64 per epoch; the buffer holds one and a
    half batches (one batch per fill), so a resume lands anywhere in the text and in a fill."""
    tiny = tmp_path_factory.mktemp("tiny_stream")
    killed_root = tmp_path_factory.mktemp("stream_killed")
    args = _stream_args(tiny, killed_root, "--trainer.callbacks+=test_resume.Throttle", "--trainer.callbacks.seconds=0.2")
    with fit_in_subprocess(args, REPO, XDG_CACHE_HOME=str(tiny / "xdg")) as process:
        reference = main(_stream_args(tiny, tmp_path_factory.mktemp("stream_reference")))
        stopped_at = sigkill_at_checkpoint(process, killed_root / "ckpt", 9)
    assert 9 <= stopped_at < reference.trainer.global_step
    saved = torch.load(killed_root / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["ActivationDataModule"]["train_loader"]["batches_done"] > 0
    resumed = main(_stream_args(tiny, killed_root, "--ckpt_path=last"))
    assert resumed.trainer.global_step == reference.trainer.global_step == 24
    for name, value in reference.model.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
        else:
            assert (torch.equal(resumed.model.state_dict()[name], value) if torch.is_tensor(value)
                    else resumed.model.state_dict()[name] == value), name
