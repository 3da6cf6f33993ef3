"""Atomic file writing: a killed or requeued job never leaves a half-written file."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    The temporary name carries host and pid, so concurrent writers (array tasks on
    several nodes) never share one, and the rename is atomic on POSIX file systems.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
