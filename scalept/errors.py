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


def one_line(err: ScalePTError) -> tuple[str, int]:
    """(the message to print, the exit code: 2 to fix the config, 1 to fix the data or files).

    Raised in a DataLoader worker, the message carries the worker's traceback; its last line is ours.
    """
    text = str(err).strip()
    line = text.splitlines()[-1].removeprefix(f"{type(err).__name__}: ") if text else type(err).__name__
    return line, 2 if isinstance(err, ConfigError) else 1
