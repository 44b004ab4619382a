"""Atomic publication: a file or directory appears complete under its final name, or not at all.

Everything this framework writes for later use (run records, checkpoints and their `latest` marker,
indexed datasets, Hugging Face exports, imported checkpoints) is written under a temporary name in the
same directory and then renamed into place, with the data and the directory entry flushed to disk.  A
process killed at any moment leaves either the previous good version or the new one, never a half.
"""

from __future__ import annotations

import ctypes
import os
import shutil


def fsync_directory(path: str) -> None:
    """Flush the directory entry of `path` (after a rename) to disk; a no-op where unsupported."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str, tag: str = "") -> str:
    """A hidden-from-readers name beside `path` for its version in progress (unique per process)."""
    return f"{path}.tmp-{os.getpid()}{tag}"


def replace_file(tmp: str, path: str) -> None:
    """Rename the finished file `tmp` over `path`, durably."""
    os.replace(tmp, path)
    fsync_directory(path)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path`: a reader sees the old content or the new, never part of it."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0


def publish_directory(tmp: str, path: str) -> None:
    """Rename the finished directory `tmp` to `path`, replacing a previous `path` whole: where the kernel
    can swap the two atomically there is no moment without a complete `path`; elsewhere the old one is
    moved aside first, so `path` is briefly absent but never partial."""
    if not os.path.exists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):  # tmp now holds the previous version
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = temporary_name(path, ".old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_directory(path)
