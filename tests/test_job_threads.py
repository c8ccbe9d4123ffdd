"""Parallel local jobs share the cores: each job of a local parallel launch (submitit_local, joblib)
takes cores // concurrent jobs torch threads, unless OMP_NUM_THREADS is set or the launcher was given
a count, and its log says how many it took."""

from __future__ import annotations

import pytest
from helpers import TINY, check_jobs, run_cli
from omegaconf import OmegaConf

from vae_cli.commands.callbacks import available_cores, concurrent_jobs, job_threads

SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def launcher(target: str, **settings):
    return OmegaConf.create({"_target_": target, **settings})


def test_jobs_at_once_per_launcher():
    assert concurrent_jobs(launcher(SUBMITIT_LOCAL), 3, cores=2) == 3  # every job at once
    assert concurrent_jobs(launcher(JOBLIB, n_jobs=3), 3, cores=2) == 3
    assert concurrent_jobs(launcher(JOBLIB, n_jobs=-1), 3, cores=2) == 2  # joblib: one worker per core
    assert concurrent_jobs(launcher(JOBLIB, n_jobs=-2), 8, cores=4) == 3  # all cores but one
    assert concurrent_jobs(launcher(JOBLIB, n_jobs=8), 2, cores=16) == 2  # no more than the sweep has
    assert concurrent_jobs(launcher(BASIC), 3, cores=2) == 1  # one after another


def test_each_job_gets_its_share_of_the_cores():
    assert job_threads(launcher(SUBMITIT_LOCAL), 3, 2, {}) == "1 (2 cores shared by 3 jobs at once)"
    assert job_threads(launcher(SUBMITIT_LOCAL), 2, 16, {}) == "8 (16 cores shared by 2 jobs at once)"
    assert job_threads(launcher(JOBLIB, n_jobs=3), 3, 2, {}) == "1 (2 cores shared by 3 jobs at once)"
    assert job_threads(launcher(BASIC), 3, 2, {}) is None  # one at a time: torch's default
    assert job_threads(launcher(SUBMITIT_LOCAL), 3, 2, {"OMP_NUM_THREADS": "2"}) is None  # the user's count
    asked = launcher(SUBMITIT_LOCAL, cpus_per_task=2)
    assert job_threads(asked, 3, 2, {}) == "2 (hydra.launcher.cpus_per_task=2)"


@pytest.mark.slow
def test_a_submitit_local_jobs_log_says_how_many_threads_it_took(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    args = [
        "vae-train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "objective=jensen,elbo",
    ]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = run_cli([*args, *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_jobs(sweep, 2)
    cores = available_cores()
    for job in range(2):
        log = (sweep / str(job) / "train.log").read_text()
        assert f"torch threads: {max(1, cores // 2)} ({cores} cores shared by 2 jobs at once)" in log
