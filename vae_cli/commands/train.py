"""vae-train: check the command line, then hand it to Hydra, whose task function runs the pipeline
(vae_cli.stages.pipeline.train). The training stages, and with them torch, are imported only once
the config has been checked, so that --help and every refusal that needs no model answer at once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra

# get_args_parser is Hydra's own command-line parser; Hydra has no public API that parses a
# command line without running the app.
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import vae_cli
from vae_cli.commands import callbacks
from vae_cli.commands.app import check_overrides, register_configs
from vae_cli.commands.boundary import user_errors
from vae_cli.errors import Abort, Interrupted, UserError

register_configs()
log = logging.getLogger(__name__)


def check_command_line(argv: list[str]) -> None:
    """Refuse, as one UserError line, what Hydra would answer with a usage block or a traceback:
    an unknown flag, --experimental-rerun (it unpickles a file), and every override check_overrides refuses."""
    args_parser = get_args_parser()

    def error(message: str) -> None:
        raise UserError(f"{message} (see vae-train --help)")

    args_parser.error = error  # type: ignore[method-assign]
    args = args_parser.parse_args(argv)
    if args.experimental_rerun is not None:
        raise UserError(
            "--experimental-rerun is not supported (it unpickles a file); continue a run with vae-train resume=RUN_DIR"
        )
    if not args.shell_completion:  # its "overrides" are its own subcommands (install=bash, query=bash)
        check_overrides(args.overrides)


@hydra.main(version_base="1.3", config_path="pkg://vae_cli.conf", config_name="config")
def _train_app(cfg: DictConfig) -> float:
    # The stages and torch, now that the config has been checked (ValidateBeforeRun or, for a
    # multirun job, right here): --help and refusals never wait for them.
    from vae_cli.run.machine import use_job_threads
    from vae_cli.stages import pipeline
    from vae_cli.stages.training import Place

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    place = Place(experiment=hydra_cfg.runtime.choices.get("experiment"))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        jobs = os.environ.get(callbacks.SWEEP_JOBS_ENV)
        place = Place(place.experiment, hydra_cfg.job.num, int(jobs) if jobs else None)
        log.info("torch threads: %s", use_job_threads(os.environ.get(callbacks.JOB_THREADS_ENV)))
    try:
        changed = callbacks.changed_keys(callbacks.task_overrides(hydra_cfg))
        return pipeline.train(cfg, run_dir, changed, callbacks.take_claim(run_dir), place)["final_loss"]
    except UserError as exc:
        raise Abort(exc) from None


def main() -> None:
    # Hydra re-raises instead of printing its own multi-line report; user_errors prints one line,
    # or the whole traceback where the user set HYDRA_FULL_ERROR=1 (kept as VAE_CLI_FULL_ERROR).
    os.environ.setdefault("VAE_CLI_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if sys.argv[1:] == ["--version"]:  # Hydra's own --version would name Hydra's
        print(f"vae-train (vae-cli) {vae_cli.__version__}")
        return
    with user_errors():
        check_command_line(sys.argv[1:])
        try:
            _train_app()
        except KeyboardInterrupt:  # outside the training loop, which checkpoints and raises Interrupted
            raise Abort(Interrupted(callbacks.sweep_stopped("interrupted (SIGINT)"), 130)) from None
        except Abort as abort:
            if not isinstance(abort.error, Interrupted):
                raise
            error = Interrupted(callbacks.sweep_stopped(str(abort.error)), abort.error.exit_code)
            raise Abort(error) from None
