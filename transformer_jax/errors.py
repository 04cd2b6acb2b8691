"""The two exceptions that end a command without a traceback: `UserError`, shown as one
`error:` line with exit code 2, and `RunStopped`, a training run stopped on purpose."""


class UserError(Exception):
    """Bad input from the user: a file, flag or field. The message says what to do."""


class RunStopped(Exception):
    """Training stopped early on purpose (a signal, a non-finite loss); exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
