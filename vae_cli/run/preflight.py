"""What can be known about a run before torch is imported, and is refused in one line: every config
value (vae_cli.run.config.validate), the run directory (it can be made and written, and a fresh run
never writes into one that holds a run), and where the images will come from."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from omegaconf import DictConfig

from vae_cli.errors import ConfigError, RunDirError
from vae_cli.run.config import data_config, validate
from vae_cli.run.datafiles import DataSource, find_data
from vae_cli.run.files import check_creatable, check_writable
from vae_cli.run.rundir import CHECKPOINT, is_run_dir


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in run_dir."""
    return f"vae-train resume={shlex.quote(str(Path(run_dir).absolute()))}"


def occupied(run_dir: Path) -> RunDirError:
    return RunDirError(
        f"{run_dir} already holds a run: refusing to overwrite it (continue it with {resume_command(run_dir)})"
    )


def requeued_job() -> bool:
    """This process is a submitit job, which Hydra's launcher may have requeued into its own run directory."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preflight(cfg: DictConfig, run_dir: Path) -> DataSource | None:
    """Check cfg and run_dir before any work; the data source of a fresh run (None for resume=, whose
    data are its saved config's, checked when that is read)."""
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.resume is not None:
        if os.path.abspath(run_dir) != os.path.abspath(cfg.resume):
            raise ConfigError(
                f"invalid value resume={cfg.resume!r}: a run resumes in its own directory, not in "
                f"{run_dir} (drop hydra.run.dir)"
            )
        if not run_dir.is_dir():
            raise RunDirError(f"cannot resume {run_dir}: no such directory")
        check_writable(run_dir, "run directory")
        return None
    if is_run_dir(run_dir):
        if not (requeued_job() and (run_dir / CHECKPOINT).exists()):
            raise occupied(run_dir)
        check_writable(run_dir, "run directory")
    else:
        check_creatable(run_dir, "run directory")
    return find_data(data_config(cfg))
