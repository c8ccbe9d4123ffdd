"""Hydra callbacks: validate every job's config before Hydra creates any directory; compare the
runs when a multirun ends."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vae_cli.config import validate
from vae_cli.errors import Abort, ConfigError, UserError

log = logging.getLogger(__name__)


def sweep_job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists of every job a basic-sweeper multirun will launch, as Hydra expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    # As BasicSweeper.sweep: the sweeper's params (e.g. from a +sweep preset) first, so that the
    # command line's overrides of the same keys win.
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class ValidateBeforeRun(Callback):
    """Refuse a bad config before Hydra writes anything; for a multirun, check every job first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_cli.resume import check_data_files, prepare

        try:
            validate(config)
            # An occupied run dir, or resume=DIR's checkpoint, config, overrides and data: before Hydra writes into it.
            start = prepare(config, Path(str(config.hydra.run.dir)), list(config.hydra.overrides.task))
            if start.resumed:
                check_data_files(start.cfg)
        except UserError as exc:
            raise Abort(exc) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        try:
            for job in sweep_job_overrides(config):
                job_config = compose(config_name=config.hydra.job.config_name, overrides=job)
                validate(job_config)
                if job_config.resume is not None:
                    raise ConfigError(f"invalid value resume={job_config.resume!r} with --multirun: resume one run at a time "
                                      "(vae-train resume=RUN_DIR)")
        except UserError as exc:
            raise Abort(exc) from None
        except (HydraException, OmegaConfBaseException) as exc:  # Hydra would turn these into a warning
            raise Abort(ConfigError(" ".join(str(exc).split()))) from None


class CompareAfterMultirun(Callback):
    """At the end of a multirun, write comparison.csv and comparison.md into the sweep directory.
    Never fails the sweep: a problem becomes one warning line (the jobs' results are on disk)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_cli.compare import write_sweep_comparison

        try:
            write_sweep_comparison(Path(str(config.hydra.sweep.dir)))
        except Exception as exc:
            log.warning("comparison.csv not written (%s: %s); `vae-plot %s` writes it later",
                        type(exc).__name__, exc, config.hydra.sweep.dir)
