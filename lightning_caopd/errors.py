"""The project's errors, each a problem the user can fix.

Each is raised with one paragraph naming the file, row, key or value and what to do;
``train.py`` and ``evaluate`` print the paragraph instead of a traceback.
"""


class DataError(ValueError):
    """A data source cannot be read or a row is malformed; the message names the file and row."""


class ResumeError(FileNotFoundError):
    """The checkpoint to resume from does not exist; the message says what to pass."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


USER_ERRORS = (DataError, ResumeError, NonFiniteError)
