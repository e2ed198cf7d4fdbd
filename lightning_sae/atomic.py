"""Files and directories that are either whole or absent: the one way the library writes them.

Everything is written beside its target under a dot-name ending in `.tmp` (so a cache's cleanup of
its own leftovers, which globs `.<name>*.tmp`, also finds an interrupted write), flushed to disk,
then renamed over the target (`os.replace`: atomic on POSIX and Windows within one directory), and
the directory is flushed so the rename itself survives a crash. A write that fails or is
interrupted removes its temporary and leaves the previous target as it was.

Why beside the target and not in the system temporary directory: a rename across filesystems is a
copy, which a killed process leaves truncated under the final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None


def temporary_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh dot-name in `target`'s directory: `.<name>.<random>.<kind>`."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.{kind}")


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux's
    /proc/self/status); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or directory to disk, so a rename never publishes data still in flight."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Replace the file `path` with what `write(handle)` writes into a binary handle; returns it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace the file `path` with `text` (UTF-8)."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


@contextmanager
def atomic_directory(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; when the block ends without an error it becomes
    `target`, replacing whatever was there (the caller decides whether that may be replaced), or,
    with `keep_existing`, only if nothing is there by then (another process that finished the
    same directory first wins, and this one's copy is dropped)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target)
    temporary.mkdir()
    try:
        yield temporary
        mode = ordinary_file_mode()
        for file in temporary.rglob("*"):
            if file.is_file() and not file.is_symlink():
                # Writers that make their files private (safetensors' save_file: 0600) would leave
                # weights unreadable to the group where cfg.json beside them is not; every file
                # gets the mode an ordinary open() gives, so the umask decides for all of them.
                os.chmod(file, mode)
                fsync_path(file)
        fsync_path(temporary)
        if keep_existing:
            try:
                os.rename(temporary, target)
            except OSError:
                if not target.is_dir():
                    raise
        elif target.exists():
            # A directory cannot be renamed over a non-empty one, so the old one steps aside
            # first and is put back if the new one cannot take its place.
            old = temporary_sibling(target, "old")
            os.rename(target, old)
            try:
                os.rename(temporary, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, target)
        fsync_path(target.parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is the PID it wrote (or "unknown")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by PID {holder}")
        self.path, self.holder = path, holder


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Holds an advisory lock on the file `path` (created if absent) while the block runs; a second
    process asking for it gets LockHeld naming the holder's PID at once, without waiting.
    flock locks belong to the open file, so a holder that dies (SIGKILL included) releases its lock
    with it, and nothing stale is ever left to clear by hand."""
    path = Path(path)
    if fcntl is None:  # one holder is the caller's to ensure
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # no PID of a finished holder left behind
    finally:
        os.close(fd)  # releases the lock


def lock_holder(path: str | os.PathLike) -> str | None:
    """The PID holding `exclusive_lock(path)` now, or None where no live process holds it (or the
    platform has no advisory locks); creates nothing."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return None
    finally:
        os.close(fd)  # releases the shared lock this probe took, if it took one
