"""The stream's background fill (overlap_model_pass): the same batches as the serial stream, errors
reach the training loop, and the thread ends with the stream."""

from __future__ import annotations

import itertools
import threading
import time

import lightning as L
import pytest
import torch
from data_fixtures import (  # noqa: F401
    _isolated_caches,
    datamodule,
    save_model,
    tiny_root,
    write_text,
)

from lightning_sae.data.stream import _ahead
from lightning_sae.data_request import DataRequest
from lightning_sae.module import SAEModule

WITH_GRAD = DataRequest(reads={"x": None, "y": "mlp_out"}, gradients=True)


def _batches(model, text, overlap: bool, skip: int = 0) -> list[dict[str, torch.Tensor]]:
    data = datamodule(model, text, None, WITH_GRAD, source="stream", buffer_tokens=64, overlap_model_pass=overlap)
    data.setup("fit")
    loader = data.train_dataloader()
    if skip:
        loader.load_state_dict({"epoch": 0, "batches_done": skip})  # as a resumed fit does
    return list(itertools.islice(iter(loader), 7))  # parts of four fills of two batches


def test_the_background_fill_serves_the_serial_streams_batches(tiny_root):  # noqa: F811
    """Activations and gradients (the model's backward runs in the fill thread), several fills,
    and a stream resumed in the middle of a fill: equal to the serial stream, batch by batch."""
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    unskipped = None
    for skip in (0, 3):
        serial, overlapped = _batches(model, text, False, skip), _batches(model, text, True, skip)
        unskipped = unskipped or serial
        torch.testing.assert_close(overlapped[0]["x"], unskipped[skip]["x"], rtol=0, atol=0)  # really resumed at `skip`
        assert len(serial) == len(overlapped) == 7
        for a, b in zip(serial, overlapped):
            assert a.keys() == b.keys() == {"x", "y", "grad"}
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_fit_with_the_background_fill(tiny_root, tmp_path):  # noqa: F811
    model, text = save_model("llama", tiny_root), write_text(tiny_root)
    data = datamodule(model, text, None, source="stream", buffer_tokens=64, overlap_model_pass=True)
    module = SAEModule(k=4, expansion_factor=2, spliced_eval_contexts=0)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 5


def _fill_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lightning-sae-stream-fill"]


def test_a_fill_error_reaches_the_consumer_at_its_item():
    def items():
        yield {"a": torch.zeros(1)}
        raise RuntimeError("model pass failed")

    ahead = _ahead(items())
    assert torch.equal(next(ahead)["a"], torch.zeros(1))
    with pytest.raises(RuntimeError, match="model pass failed"):
        next(ahead)


def test_closing_the_stream_ends_its_fill_thread():
    computed = []

    def endless():
        for n in itertools.count():
            computed.append(n)
            yield {"n": torch.tensor(n)}

    before = len(_fill_threads())
    ahead = _ahead(endless())
    assert [int(next(ahead)["n"]) for _ in range(3)] == [0, 1, 2]
    assert len(_fill_threads()) == before + 1
    ahead.close()
    deadline = time.monotonic() + 5
    while len(_fill_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_fill_threads()) == before
    assert len(computed) <= 5  # at most one item ahead, plus the one being handed over
