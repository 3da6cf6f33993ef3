"""Console logging of the entry point: progress on stdout, warnings and errors on stderr.

Hydra's default job logging writes everything to stdout, so ``2> err.log`` or a Slurm
``--error`` file would hold no error at all. ``conf/config.yaml`` sends records below
WARNING through this filter to stdout and the rest to stderr (each record once).
"""
from __future__ import annotations

import logging


class BelowWarning(logging.Filter):
    """Lets through DEBUG and INFO records only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING
