"""Errors the pipeline reports to its user, and the exit codes that go with them.

Every stage checks its inputs before any work, state or cluster start-up, and raises
`InputError` naming the file, the field and the fix. The command line turns it (and the
ValueError / FileNotFoundError family the standard library raises for the same mistakes)
into one line on stderr and exit code 2; a run that started and then failed exits 1.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the input was fine; the run did not complete
EXIT_BAD_INPUT = 2  # the user can fix it: the message says how


class InputError(ValueError):
    """Bad input: `where` (a file or option), `problem`, and the `fix`."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}" + (f" ({fix})" if fix else ""))

    def __reduce__(self):  # pickles with its fields: a worker process or a Ray task can hand it back
        return type(self), (self.where, self.problem, self.fix)


def check(condition: bool, where: str, problem: str, fix: str | None = None) -> None:
    """Raise InputError(where, problem, fix) unless condition holds."""
    if not condition:
        raise InputError(where, problem, fix)


BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
