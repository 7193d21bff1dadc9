"""The one exception a user sees as a one-line message (the CLI prints it without a traceback)."""


class InputError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
