"""Progress of long work outside the Trainer's loop (caching activations, the latent browser).

On a terminal, tqdm's bar; when the output goes to a file (a batch job's log, `nohup`), one plain
line every `interval` seconds instead, as the training loop's own progress does (console.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any


class PlainLines:
    """A counter with tqdm's `update`/`close` that prints one plain line every `interval` seconds
    (and one at the end): what a log file or a batch job's output should show of long work."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = 30.0, stream: Any = None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self._started = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self._last >= self.interval:
            self._line()

    def close(self) -> None:
        if self.done:
            self._line("done" if self.done >= self.total else "stopped")

    def _line(self, note: str = "") -> None:
        self._last = now = time.monotonic()
        elapsed = now - self._started
        rate = self.done / max(elapsed, 1e-9)
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        left = (self.total - self.done) / rate / 60 if rate > 0 and self.total > self.done else None
        print(f"lightning-sae: {self.desc}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate:,.0f} {self.unit}/s, "
              f"{elapsed / 60:.1f} min" + (f", about {left:.0f} min left" if left is not None else "")
              + (f" ({note})" if note else ""), file=self.stream, flush=True)


def progress_bar(total: int, desc: str, unit: str, interval: float = 30.0, enabled: bool = True, **tqdm_options: Any) -> Any:
    """tqdm's bar on a terminal; elsewhere `PlainLines`, a line every `interval` seconds; with
    `enabled=False`, a bar that prints nothing."""
    if enabled and not sys.stderr.isatty():
        return PlainLines(total, desc, unit, interval)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=not enabled, **tqdm_options)
