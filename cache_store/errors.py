"""The refusals a user can act on. Every command line prints a UserError's message as one line,
`error: ...`, and exits 2; any other exception is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input or state the user can fix: the message says what is wrong and what to do."""


class CacheError(UserError):
    """A cache is missing, incomplete, corrupted, or not the one the caller asked for."""
