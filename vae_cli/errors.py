"""Errors a user can fix. The console scripts print each as one line and exit with its exit_code:
2 for bad input, 3 for a non-finite loss, 4 for a sweep's cluster job that failed or was
cancelled, 128 + the signal for an interrupted run."""


class UserError(Exception):
    """Bad input: printed as `vae-cli: error: <message>` without a traceback."""

    exit_code = 2
    prefix = "error: "


class ConfigError(UserError):
    """A config value or combination that is not allowed."""


class DataError(UserError):
    """Data files that are missing, corrupt or cannot be built."""


class RunDirError(UserError):
    """A run directory (or a file in it) that cannot be used."""


class PathError(UserError):
    """A path that cannot be created or written (not a directory, no permission, a read-only file system)."""


class InputError(UserError, ValueError):
    """A value given to the Python API (vae_cli.api) that is not allowed: its shape, dtype, device,
    range or size, named with what is expected."""


class NonFiniteError(UserError):
    """A NaN or Inf loss, term or gradient: the run stops and keeps its last good checkpoint."""

    exit_code = 3


class JobFailed(UserError):
    """A sweep's job on a cluster (hydra/launcher=submitit_*) failed, was cancelled or was killed."""

    exit_code = 4


class Interrupted(UserError):
    """SIGINT or SIGTERM between steps: the run wrote a checkpoint and says how to resume it."""

    prefix = ""  # printed as `vae-cli: interrupted at step N; resume with: ...`, not as an error

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Abort(BaseException):
    """Carries a UserError past code that swallows or re-wraps Exceptions: Hydra turns an
    exception in a callback into a warning and prefixes one from a job with its own line."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error
