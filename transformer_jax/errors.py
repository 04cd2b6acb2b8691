"""The one exception type whose message is shown to a user as a single line (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, flag or field. The message says what to do."""


class RunStopped(Exception):
    """Training stopped early on purpose (a signal, a non-finite loss); exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
