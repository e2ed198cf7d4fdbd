"""Activations streamed from the language model during the fit: a shuffle buffer per rank.

Each rank reads its own training contexts (ContextPlan), runs the model on them in groups and
fills a buffer of `buffer_batches * batch_size` rows; the buffer is permuted (seeded by seed,
rank and fill number) and served as `buffer_batches` batches, then filled afresh from the
following rows. Each batch so mixes tokens of every context in the buffer, as SAELens's mixing
buffer does, and nothing but the model's output ever reaches memory.

Resume: the whole stream of a rank is a function of (seed, rank, world) and the text, so the
only state is how many batches the rank has consumed. Batch n lies in fill n // buffer_batches,
whose first row is known from token counts alone; a resumed stream counts its way there without
the model, recomputes the rows of that fill (the groups of contexts are aligned, so they come
out identical) and continues with the same permutation. The buffer is not saved in checkpoints:
it is rebuilt, at the cost of one buffer's worth of model passes.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

RowSource = Callable[[int], Iterator[dict[str, Tensor]]]
"""start_row -> chunks of this rank's rows, in order, from that row on."""


class StreamedBatches(IterableDataset):
    """Training batches of one rank from a shuffle buffer over `rows(start_row)`.

    Driven by batching.ResumableLoader like ShuffledBatches: it sets `epoch` and `skip_batches`
    and each pass yields `steps_per_epoch` batches. Epochs do not repeat data: epoch e serves
    batches e*steps .. (e+1)*steps - 1 of the endless stream.
    """

    def __init__(self, rows: RowSource, batch_size: int, buffer_batches: int, steps_per_epoch: int, seed: int, rank: int,
                 overlap: bool = False):
        if buffer_batches < 1 or steps_per_epoch < 1:
            raise ValueError(f"buffer_batches and steps_per_epoch must be >= 1, got {buffer_batches}, {steps_per_epoch}")
        self.rows, self.batch_size, self.buffer_batches = rows, batch_size, buffer_batches
        self.overlap = overlap  # fill the next buffer in a background thread while this one is served
        self.steps_per_epoch, self.seed, self.rank = steps_per_epoch, seed, rank
        self.epoch = 0
        self.skip_batches = 0
        self._live: tuple[int, Iterator[dict[str, Tensor]]] | None = None  # (next batch, its generator)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        first = self.epoch * self.steps_per_epoch + self.skip_batches
        end = (self.epoch + 1) * self.steps_per_epoch
        if self._live is not None and self._live[0] == first:
            batches = self._live[1]  # the previous epoch ended where this one starts: keep its buffer
        else:
            batches = self._batches(first)
        self._live = None
        for index in range(first, end):
            batch = next(batches)
            # Recorded before the yield: an epoch whose last batch was taken continues here.
            self._live = (index + 1, batches)
            yield batch

    def _permutation(self, fill: int) -> Tensor:
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + fill) % 2**63)
        return torch.randperm(self.buffer_batches * self.batch_size, generator=generator)

    def _batches(self, first: int) -> Iterator[dict[str, Tensor]]:
        """Batches first, first + 1, ... of the endless stream."""
        rows_per_fill = self.buffer_batches * self.batch_size
        fill, skip = divmod(first, self.buffer_batches)
        buffers = _fills(self.rows(fill * rows_per_fill), rows_per_fill)
        if self.overlap:
            buffers = _ahead(buffers)
        for buffer in buffers:
            order = self._permutation(fill)
            for b in range(skip, self.buffer_batches):
                picked = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield {key: value[picked.to(value.device)] for key, value in buffer.items()}
            del buffer
            fill, skip = fill + 1, 0


def _fills(chunks: Iterator[dict[str, Tensor]], count: int) -> Iterator[dict[str, Tensor]]:
    """Consecutive buffers of `count` rows from the chunks (the row source never ends)."""
    leftover: dict[str, Tensor] | None = None
    while True:
        buffer, leftover = _take(chunks, count, leftover)
        yield buffer


def _ahead(items: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """`items`, each computed in a background thread while the previous one is in use: the model
    pass of the next fill overlaps the training steps on this one (on a GPU the model's kernel
    launches overlap the SAE step's; on a CPU the two share the cores, see docs/performance.md).

    One item is computed ahead, so at most two buffers exist at once. Errors reach the consumer
    at the item where they happened. The thread stops when this generator is closed or dropped,
    and at the latest when the interpreter exits (a thread still inside the model while Python
    finalises would abort the process).
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def finish() -> None:
        stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting to hand over its item
                handoff.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)

    def hand_over(entry: tuple) -> None:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in items:
                hand_over((item, None))
                del item
                if stop.is_set():
                    return
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, raised there)
            hand_over((None, error))

    thread = threading.Thread(target=produce, name="lightning-sae-stream-fill", daemon=True)
    thread.start()
    atexit.register(finish)
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            yield item
            del item
    finally:
        finish()
        atexit.unregister(finish)


def _take(
    chunks: Iterator[dict[str, Tensor]], count: int, leftover: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The next `count` rows (leftover first, then chunks) and what remains of the last chunk."""
    parts = [leftover] if leftover is not None else []
    have = 0 if leftover is None else len(next(iter(leftover.values())))
    while have < count:
        chunk = next(chunks)  # the row source never ends (it cycles the text)
        parts.append(chunk)
        have += len(next(iter(chunk.values())))
    keys = parts[0].keys()
    joined = {key: torch.cat([part[key] for part in parts]) if len(parts) > 1 else parts[0][key] for key in keys}
    rest = {key: value[count:] for key, value in joined.items()} if have > count else None
    return {key: value[:count] for key, value in joined.items()}, rest


class StreamedValidation(IterableDataset):
    """Held-out rows of one rank: one batch per group of contexts, in order. Every rank runs the
    same number of groups (ContextPlan.validation with equal shares)."""

    def __init__(self, groups: Callable[[], Iterator[dict[str, Tensor]]], contexts_per_rank: int, group_size: int):
        self.groups, self.num_batches = groups, math.ceil(contexts_per_rank / group_size)
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        yield from self.groups()
