"""Atomic file writing: a killed or requeued job never leaves a half-written file."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger(__name__)
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(*folders: str | os.PathLike) -> int:
    """Delete the temporaries of :func:`atomic_path` in ``folders`` (and below) whose writer is gone.

    A writer killed with ``kill -9`` (or by the OOM killer) never reaches its clean-up. A
    temporary is stale when it was written on this host by a process that no longer runs;
    temporaries of other hosts are left alone (their writer may be alive there). Returns how
    many were removed; stages call this when they start.
    """
    host, removed = socket.gethostname(), 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.rglob(".*.tmp-*"):
            match = _TEMPORARY.match(path.name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by killed writers under %s", removed,
                 ", ".join(str(f) for f in folders))
    return removed
