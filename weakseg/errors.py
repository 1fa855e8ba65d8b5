"""User-facing errors. Each carries one line that names the file (or key) and the problem."""

from __future__ import annotations

from pathlib import Path


class WeaksegError(Exception):
    """Base class: the CLI prints the message and exits non-zero, without a traceback."""


class ConfigError(WeaksegError):
    """A config key is missing, unknown or has a value outside the allowed ones."""


class DataError(WeaksegError):
    """A problem with one file of a dataset (or one entry of its index)."""

    def __init__(self, path: str | Path, problem: str):
        # A file is named by its absolute path, whichever folder the command ran from, so the
        # same file reads the same in every command's errors (an id, a str, stays as given).
        self.path = str(path.absolute() if isinstance(path, Path) else path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Picklable with its two arguments: problems found in worker processes travel back.
        return (type(self), (self.path, self.problem))


class DatasetProblems(WeaksegError):
    """Several `DataError`s found together; the message has one line per problem."""

    def __init__(self, problems: list[DataError], what: str = "dataset"):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in {what}:"] + [str(p) for p in self.problems]
        super().__init__("\n".join(lines))


class NonFiniteLoss(WeaksegError, FloatingPointError):
    """Training met a NaN or infinite loss; the message names the term, the step and the
    last good checkpoint (which is left as it was)."""
