"""Atomic writes and the clean-up of temporaries that killed writers leave behind."""
from __future__ import annotations

import os
import socket

import pytest

from scalept.atomic import atomic_path, remove_stale_temporaries


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(target.parent.iterdir())
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_only_temporaries_of_gone_writers_on_this_host_are_removed(tmp_path, dead_pid):
    host = socket.gethostname()
    (tmp_path / "08.parts").mkdir()
    stale = [tmp_path / f".last.pt.tmp-{host}-{dead_pid()}",
             tmp_path / "08.parts" / f".000000-000100.h5.tmp-{host}-{dead_pid()}"]
    kept = [tmp_path / f".best.pt.tmp-{host}-{os.getpid()}",  # its writer runs: this very process
            tmp_path / f".08.h5.tmp-othernode-{dead_pid()}",  # another node's writer may be alive there
            tmp_path / "last.pt", tmp_path / ".hidden"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, tmp_path / "missing") == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
