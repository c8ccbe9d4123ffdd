"""Errors a user can fix. The console scripts print each as one line and exit with code 2."""


class UserError(Exception):
    """Bad input: printed as `vae-cli: error: <message>` without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config value or combination that is not allowed."""


class DataError(UserError):
    """Data files that are missing, corrupt or cannot be built."""


class RunDirError(UserError):
    """A run directory (or a file in it) that cannot be used."""


class Abort(BaseException):
    """Carries a UserError past code that swallows or re-wraps Exceptions: Hydra turns an
    exception in a callback into a warning and prefixes one from a job with its own line."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error
