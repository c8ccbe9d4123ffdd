"""Hydra's side of vae-train: the overrides as plain keys, the check of every job's config before
Hydra creates any directory, and the comparison of the runs when a multirun ends."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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

from vae_cli.commands.app import check_overrides
from vae_cli.errors import Abort, ConfigError, UserError
from vae_cli.run.files import check_creatable
from vae_cli.run.preflight import preflight
from vae_cli.stages.comparison import write_sweep_comparison

log = logging.getLogger(__name__)

# The claim (the run directory's lock and where the run starts) that on_run_start made for a
# single run, by run directory, for the task function (vae_cli.commands.train) to take: the run is
# checked and its directory held before Hydra writes into it.
_claims: dict[Path, Any] = {}

# What the jobs of a multirun read, in this process or in the processes a local launcher starts (they
# inherit the environment): how many jobs the sweep has, and the torch threads each job takes.
SWEEP_JOBS_ENV = "VAE_CLI_SWEEP_JOBS"
JOB_THREADS_ENV = "VAE_CLI_JOB_THREADS"  # "N" or "N (why)"
# The multirun in progress in this process, for the line of a sweep stopped by Ctrl-C.
_sweep: dict[str, Path] = {}


def changed_keys(overrides: list[str]) -> list[str]:
    """The config keys the overrides set, dotted (`objective` for a group choice `objective=elbo`)."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    return [override.key_or_group.replace("/", ".") for override in parsed]


def task_overrides(hydra_node: DictConfig) -> list[str]:
    """The command line's overrides as typed (`data.root=${oc.env:X}` is not resolved here)."""
    return [str(o) for o in OmegaConf.to_container(hydra_node.overrides.task, resolve=False)]


def absolute(path: str | Path) -> Path:
    """The path as Hydra's runtime.output_dir has it (os.path.abspath: `a/../b` is `b`)."""
    return Path(os.path.abspath(path))


def take_claim(run_dir: Path) -> Any:
    return _claims.pop(absolute(run_dir), None)


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
    """Refuse a bad config before Hydra writes anything, and hold the run directory; for a multirun,
    check every job first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _sweep.clear()  # a single run: no sweep of an earlier command in this process is in progress
        run_dir = absolute(str(config.hydra.run.dir))
        with refused_in_one_line():
            source = preflight(config, run_dir)
            # The stages and torch, only now that the config has been checked: refusals never wait for them.
            from vae_cli.stages import pipeline

            changed = changed_keys(task_overrides(config.hydra))
            _claims[run_dir] = pipeline.claim_run(config, run_dir, changed, source)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refused_in_one_line():
            sweep_dir = Path(str(config.hydra.sweep.dir))
            check_creatable(sweep_dir, "sweep directory")
            jobs = []
            for number, job in enumerate(sweep_job_overrides(config)):
                check_overrides(job)
                job_config = compose(config_name=config.hydra.job.config_name, overrides=job)
                if job_config.resume is not None:
                    raise ConfigError(
                        f"invalid value resume={job_config.resume!r} with --multirun: resume one run at "
                        "a time (vae-train resume=RUN_DIR)"
                    )
                preflight(job_config, sweep_dir / str(number))  # hydra.sweep.subdir is the job's number
                jobs.append(job_config)
            if runs_here(config):
                # The stages and torch, only now that every job's config has been checked.
                from vae_cli.stages import pipeline

                for job_config in jobs:
                    pipeline.check_job(job_config)
            _sweep["dir"] = sweep_dir
            os.environ[SWEEP_JOBS_ENV] = str(len(jobs))
            threads = job_threads(config.hydra.launcher, len(jobs), available_cores(), os.environ)
            if threads is not None:
                os.environ[JOB_THREADS_ENV] = threads
            else:
                os.environ.pop(JOB_THREADS_ENV, None)


def available_cores() -> int:
    """The cores this process may run on (a cgroup or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def concurrent_jobs(launcher: DictConfig, n_jobs: int, cores: int) -> int:
    """How many of a sweep's n_jobs the launcher runs at once on this machine."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):  # n_jobs -1: one per core, -2: all but one, ... (joblib's rule)
        workers = int(launcher.get("n_jobs") or 1)
        return max(1, min(n_jobs, workers if workers > 0 else cores + 1 + workers))
    if target.endswith("submitit_launcher.LocalLauncher"):  # submitit_local starts every job at once
        return n_jobs
    return 1


def job_threads(launcher: DictConfig, n_jobs: int, cores: int, env: Mapping[str, str]) -> str | None:
    """The torch threads of each job of a local parallel launch, "N (why)": cores // concurrent jobs
    (at least 1), as OpenMP threads that outnumber the cores slow every job far more than their number;
    the count the user asked for (hydra.launcher.cpus_per_task); None where OMP_NUM_THREADS is set or
    the jobs run one at a time (each takes torch's default)."""
    if "OMP_NUM_THREADS" in env:
        return None
    asked = launcher.get("cpus_per_task") if "LocalLauncher" in str(launcher.get("_target_", "")) else None
    if asked:
        return f"{int(asked)} (hydra.launcher.cpus_per_task={int(asked)})"
    concurrent = concurrent_jobs(launcher, n_jobs, cores)
    if concurrent <= 1:
        return None
    return f"{max(1, cores // concurrent)} ({cores} cores shared by {concurrent} jobs at once)"


def sweep_stopped(message: str) -> str:
    """The line of a multirun stopped by Ctrl-C (or SIGTERM): comparison.csv of the runs that finished
    is written, and the line names the one command that draws them; unchanged outside a multirun."""
    sweep_dir = _sweep.pop("dir", None)
    if sweep_dir is None:
        return message
    try:
        write_sweep_comparison(sweep_dir)
    except Exception:  # no run finished, or one is unreadable: vae-plot says which
        pass
    return f"{message}; the sweep stopped: compare and draw the runs that finished with: vae-plot {sweep_dir}"


@contextmanager
def refused_in_one_line() -> Iterator[None]:
    """A callback's refusal as Abort, which the error boundary prints as one line: Hydra turns any
    other exception of a callback into a warning and goes on."""
    try:
        yield
    except UserError as exc:
        raise Abort(exc) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise Abort(ConfigError(" ".join(str(exc).split()))) from None


def runs_here(config: DictConfig) -> bool:
    """The launcher runs the jobs on this machine, so its device and memory are theirs (a SLURM job's
    node checks them when the job starts)."""
    return "slurm" not in str(config.hydra.launcher.get("_target_", "")).lower()


class CompareAfterMultirun(Callback):
    """At the end of a multirun, write comparison.csv and comparison.md into the sweep directory.
    Never fails the sweep: a problem becomes one warning line (the jobs' results are on disk)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _sweep.clear()
        try:
            write_sweep_comparison(Path(str(config.hydra.sweep.dir)))
        except Exception as exc:
            log.warning(
                "comparison.csv not written (%s: %s); `vae-plot %s` writes it later",
                type(exc).__name__,
                exc,
                config.hydra.sweep.dir,
            )
