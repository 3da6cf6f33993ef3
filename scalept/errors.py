"""Errors caused by the user's input: printed as one line, never as a traceback."""


class ScalePTError(Exception):
    """Bad input or configuration; the message names the file or config key and the fix."""


class ConfigError(ScalePTError, ValueError):
    """A config value is missing or out of range."""


class TrainingInterrupted(ScalePTError, RuntimeError):
    """Training stopped on a signal after writing last.pt; rerunning the same command resumes it."""


class TrainingDiverged(ScalePTError, RuntimeError):
    """The loss stopped being a finite number; no checkpoint was written after it did."""


class DiskFullError(ScalePTError, OSError):
    """A write found no space left; nothing half-written is kept, finished work stays."""
