"""The step functions that stages run (scalept/steps.py)."""
from __future__ import annotations

import logging

from tiny_training import compose_tiny

from scalept import steps


def test_synth_says_when_a_sequence_holds_more_frames_than_asked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="scalept"):
        steps.synth(compose_tiny(tmp_path, tmp_path / "run", "dataset.synthetic.frames_per_sequence=3",
                                 "dataset.synthetic.azimuth_steps=64"))
        assert not caplog.records
        steps.synth(compose_tiny(tmp_path, tmp_path / "run", "dataset.synthetic.frames_per_sequence=2",
                                 "dataset.synthetic.azimuth_steps=64"))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3  # sequences 00, 01 and 08
    assert all("holds 3 frames, more than dataset.synthetic.frames_per_sequence=2" in w for w in warned), warned
