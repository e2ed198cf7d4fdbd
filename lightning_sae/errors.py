"""Errors that mean "the input or the run is wrong", which the `lightning-sae` command reports as
one line (`lightning-sae: error: ...`) instead of a traceback.

`LightningSAEError` marks the library's own; the CLI also reports the built-in `ValueError` and
`OSError` families this way, since the library raises those for bad settings and missing files.
Set LIGHTNING_SAE_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import re


class LightningSAEError(Exception):
    """Base of the errors the CLI reports without a traceback."""


class ConfigError(LightningSAEError, ValueError):
    """A setting, or a combination of settings, that cannot work."""


class DataError(LightningSAEError, ValueError):
    """Data that cannot be trained on: empty, too short, non-finite, or a damaged cache."""


class CheckpointError(LightningSAEError, ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt, or not loadable safely."""


class NonFiniteLossError(LightningSAEError, FloatingPointError):
    """Training produced a NaN or infinite loss (or weights); it was stopped."""


def unpickling_reason(error: BaseException) -> str:
    """The line of torch's weights_only refusal that says what was refused ("Trying to load
    unsupported GLOBAL posix.system ..."), without its advice to retry with weights_only=False,
    which is exactly what must not happen with a file of unknown origin."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Check the documentation", "Please file an issue")
    specific = [line for line in lines if not line.startswith(generic)]
    reason = (specific or lines or [type(error).__name__])[0]
    return re.sub(r"^WeightsUnpickler error:\s*", "", reason).rstrip(".")


def unsafe_checkpoint_message(path: object, error: BaseException) -> str:
    return (
        f"refusing to load {path}: it is not a plain weights checkpoint ({unpickling_reason(error)}). "
        "Checkpoints are loaded with weights_only=True, which never runs code stored in the file; "
        "a file that needs more than that is either not a lightning-sae checkpoint or was tampered with"
    )


def one_line(error: BaseException | str) -> str:
    """An error's message as one line. An error raised in a DataLoader worker comes back wrapped
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its own message
    is the traceback's last line, after the exception's name."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def unreadable_safetensors(path: object, error: BaseException) -> str:
    return f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
