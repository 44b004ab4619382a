"""The errors that mean "what you gave cannot work": a flag, a file, a data set, a checkpoint.

Entry points print a `UserError` as one `error: ...` line naming the flag, file or checkpoint, and exit 2
(`megatron_dataeff.entry.tool_main` is that frame for the tools).  Anything else that escapes is a bug in
this framework (or in a library it calls) and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, stated in terms the user can act on (the flag, file, line or checkpoint is named)."""

    agreed = False  # raised alike by every rank of a distributed run (collectively): rank 0 reports it


class ConfigError(UserError, ValueError):
    """A configuration that cannot work; the message names the flags."""


class DataError(UserError, ValueError):
    """A data set that cannot be used as asked (unreadable, too small for the split or budget)."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named is not there; the message names it (and its flag)."""


class OutputExistsError(UserError, FileExistsError):
    """An output path the user named holds something that will not be replaced; the message names it."""
