"""Atomic file writing: a killed or requeued job never leaves a half-written file."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from scalept.errors import DiskFullError

log = logging.getLogger(__name__)
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


DISK_FULL_MARKS = ("No space left on device", "errno = 28", "Disk quota exceeded")
LOW_SPACE = 64 << 20  # bytes: a write that failed with less free than this most likely ran out of space


def _free_bytes(folder: Path) -> int:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def is_disk_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``err`` (from h5py, torch.save, a plain write) means the disk under ``folder`` is full.

    h5py and torch do not always keep the errno: their message is read, and a write error
    with next to no space left under ``folder`` counts too.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(mark in str(err) for mark in DISK_FULL_MARKS):
        return True
    return isinstance(err, (OSError, RuntimeError)) and "writ" in str(err) and _free_bytes(Path(folder)) < LOW_SPACE


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> DiskFullError:
    folder = Path(path).parent
    need = f" needs about {needed / 1e6:,.0f} MB but" if needed else ""
    return DiskFullError(f"{path}: disk full: writing it{need} {folder} has {_free_bytes(folder) / 1e6:,.0f} MB "
                         "free; free space there (or point the output elsewhere) and rerun: finished work is kept")


def ensure_free_space(path: str | os.PathLike, needed: int) -> None:
    """Refuse a write of about ``needed`` bytes to ``path`` before it starts (a full disk mid-write
    leaves some libraries, HDF5 among them, in a state that can crash the process at exit)."""
    if _free_bytes(Path(path).parent) < needed:
        raise disk_full_error(path, needed)


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
    except (OSError, RuntimeError) as err:
        if not isinstance(err, DiskFullError) and is_disk_full(err, final.parent):
            raise disk_full_error(final) from None
        raise
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
        # os.walk, not rglob: a folder that another task removes during the walk (a sequence's
        # .parts after its merge) is skipped instead of raising FileNotFoundError
        for root, _, names in os.walk(folder):
            for name in names:
                match = _TEMPORARY.match(name)
                if match and match["host"] == host and not _alive(int(match["pid"])):
                    with contextlib.suppress(FileNotFoundError):
                        Path(root, name).unlink()
                        removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by killed writers under %s", removed,
                 ", ".join(str(f) for f in folders))
    return removed
