"""User-facing errors: one line on stderr and a documented exit status, never a traceback."""

EXIT_OK = 0
EXIT_FAILED = 1      # the operation ran and failed (bad diff found by diff-info --verify, busy mount, ...)
EXIT_USAGE = 2       # bad input: bad arguments, missing device, corrupt or mismatched diff, wrong size


class UserError(Exception):
    """An error the user can fix; the CLI prints `fusesnap: <message>` and exits with `exit_status`."""

    def __init__(self, message: str, exit_status: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_status = exit_status
