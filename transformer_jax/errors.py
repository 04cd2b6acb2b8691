"""The one exception type whose message is shown to a user as a single line (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, flag or field. The message says what to do."""
