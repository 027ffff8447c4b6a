"""Writing files so that a killed process never leaves a torn one behind."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` in one
    ``os.replace`` (atomic on POSIX), on an exception it is removed and ``path`` is left as
    it was."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_save(path, save_fn) -> None:
    """``save_fn(tmp_path)`` writes the file (e.g. ``safetensors.torch.save_file``); it then
    replaces ``path`` atomically."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
