"""Errors a user can act on, apart from the bugs.

The CLI prints a `UserError` (any subclass) as one line, ``pneumoscope VERB: error: ...``,
with exit code 2; every other exception is a bug or an environment failure and keeps its
traceback (exit 1), so it can be reported and fixed rather than read as a bad option.

The subclasses also derive from the builtin a caller would naturally catch
(`OptionError` is a `ValueError`, `MissingFileError` a `FileNotFoundError`), so library
code that catches those keeps working. Standard library and nothing else: the CLI
imports this before it knows which verb runs.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the file or option and the problem."""


class OptionError(UserError, ValueError):
    """An option or argument value the command cannot use (unknown name, out of range)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command was pointed at does not exist or has not the layout."""


class DataError(UserError, ValueError):
    """Input data the command cannot use (unreadable contents, too few images, a bad CSV)."""


class NothingScoredError(DataError):
    """predict or explain could score no image: an empty result must not pass for one in
    a pipeline (exit 2, one line)."""
