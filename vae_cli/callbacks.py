"""Hydra's side of vae-train: the overrides as plain keys, the check of every job's config before
Hydra creates any directory, and the comparison of the runs when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose

# BasicSweeper.split_arguments is how Hydra expands sweep overrides into jobs; no public API
# expands them without launching the jobs.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_cli.compare import write_sweep_comparison
from vae_cli.config import validate
from vae_cli.errors import Abort, ConfigError, UserError
from vae_cli.pipeline import StartPoint, prepare
from vae_cli.rundir import check_creatable

log = logging.getLogger(__name__)

# The StartPoint that on_run_start prepared for a single run, by run directory, for the task
# function (vae_cli.cli) to take: the run is checked once, before Hydra writes into it.
_prepared: dict[Path, StartPoint] = {}


def changed_keys(overrides: list[str]) -> list[str]:
    """The config keys the overrides set, dotted (`objective` for a group choice `objective=elbo`)."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    return [override.key_or_group.replace("/", ".") for override in parsed]


def task_overrides(hydra_node: DictConfig) -> list[str]:
    """The command line's overrides as typed (`data.root=${oc.env:X}` is not resolved here)."""
    return [str(o) for o in OmegaConf.to_container(hydra_node.overrides.task, resolve=False)]


def take_prepared(run_dir: Path) -> StartPoint | None:
    return _prepared.pop(Path(run_dir).absolute(), None)


def sweep_job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists of every job a basic-sweeper multirun will launch, as Hydra expands them."""
    # As BasicSweeper.sweep: the sweeper's params (e.g. from a +sweep preset) first, so that the
    # command line's overrides of the same keys win.
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += task_overrides(config.hydra)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class ValidateBeforeRun(Callback):
    """Refuse a bad config before Hydra writes anything; for a multirun, check every job first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        try:
            changed = changed_keys(task_overrides(config.hydra))
            _prepared[run_dir] = prepare(config, run_dir, changed)
        except UserError as exc:
            raise Abort(exc) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_creatable(Path(str(config.hydra.sweep.dir)), "sweep directory")
            for job in sweep_job_overrides(config):
                job_config = compose(config_name=config.hydra.job.config_name, overrides=job)
                validate(job_config)
                if job_config.resume is not None:
                    raise ConfigError(
                        f"invalid value resume={job_config.resume!r} with --multirun: resume one run at "
                        "a time (vae-train resume=RUN_DIR)"
                    )
        except UserError as exc:
            raise Abort(exc) from None
        except (HydraException, OmegaConfBaseException) as exc:  # Hydra would turn these into a warning
            raise Abort(ConfigError(" ".join(str(exc).split()))) from None


class CompareAfterMultirun(Callback):
    """At the end of a multirun, write comparison.csv and comparison.md into the sweep directory.
    Never fails the sweep: a problem becomes one warning line (the jobs' results are on disk)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            write_sweep_comparison(Path(str(config.hydra.sweep.dir)))
        except Exception as exc:
            log.warning(
                "comparison.csv not written (%s: %s); `vae-plot %s` writes it later",
                type(exc).__name__,
                exc,
                config.hydra.sweep.dir,
            )
