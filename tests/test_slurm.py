"""Sweeps on a real SLURM cluster: scripts/slurm_cluster.sh starts a one-node slurmctld, slurmd
and slurmdbd (on MariaDB) under a temporary directory, and `vae-train -m ...
hydra/launcher=submitit_slurm` runs its jobs there. A sweep completes and vae-plot draws it; a
preempted job and a timed-out one are requeued, resume in their run directories and end bit for
bit as a run that was never stopped; a cancelled job and a failing one end the sweep with one
line naming the job, in bounded time.

They need root and Debian's packages (`make slurm-packages`); elsewhere they skip with one line,
and with VAE_CLI_SLURM=required (.ci/run) they fail instead."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, TINY, assert_same_run, check_jobs, compose_config, read_table, run_cli, skip_figures

from vae_cli.run.rundir import LOSSES
from vae_cli.stages.pipeline import train

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "sbatch", "sacct", "scancel")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bit-identity needs the same thread count
# One CPU and 1 GB a job (the launcher's own default, 4 GB or none, may exceed a small node).
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
TINY_NO_SAMPLES = [o for o in TINY if not o.startswith("n_samples=")]
# Tiny steps (about 600 a second on one core of the 2-core CI machine), to be stopped part way.
LONG = [o for o in TINY if not o.startswith(("n_train_iters=", "model.hidden="))] + [
    "model.hidden=32",
    "checkpoint_every=100",
]
# Steps of real work (about 37 a second on a quiet CI machine, 10 under load): the timeout test
# measures the pace and sizes its job by it.
SLOW = [o for o in LONG if not o.startswith(("model.hidden=", "n_samples=", "batch_size="))] + [
    "model.hidden=64",
    "n_samples=64",
    "batch_size=64",
]
WAIT = 300  # seconds any one sweep may take before the test calls it a hang


def _unavailable() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (scripts/slurm_cluster.sh)"
    if not all(shutil.which(d) for d in DAEMONS):
        return "SLURM is not installed (make slurm-packages, as root on Debian)"
    return None


def _free_port_base() -> int:
    """Four consecutive free ports on 127.0.0.1 (slurmctld, slurmd, slurmdbd, MariaDB)."""
    for base in range(16817, 30000, 10):
        try:
            for port in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no four free ports for the test cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster; SLURM_CONF set for the client tools the sweeps call."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("VAE_CLI_SLURM") == "required":
            pytest.fail(f"VAE_CLI_SLURM=required, but {reason}")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CLUSTER_PORT": str(_free_port_base())}
    started = time.perf_counter()
    subprocess.run(["bash", str(CLUSTER), "start", str(directory)], env=env, check=True, timeout=180)
    print(f"\nslurm cluster up in {time.perf_counter() - started:.1f} s")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "etc" / "slurm.conf")
    yield directory
    subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], env=env, timeout=120)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    skip_figures(monkeypatch)  # not compared; seconds each
    yield
    torch.set_num_threads(threads)


def sweep(args: list[str], sweep_dir: Path) -> subprocess.Popen:
    """`vae-train -m ARGS` on the cluster, in the background; stderr in sweep_dir/../sweep.err."""
    err = open(sweep_dir.parent / "sweep.err", "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(BIN / "vae-train"), "-m", *LAUNCHER, *args, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=sweep_dir.parent)


def finish(proc: subprocess.Popen, sweep_dir: Path, wait: float = WAIT) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        pytest.fail(f"the sweep did not end within {wait:.0f} s")
    return code, (sweep_dir.parent / "sweep.err").read_text()


def job_id(sweep_dir: Path) -> str:
    """The SLURM id of the sweep's only job (submitit's folder is named by it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        folders = [p.name for p in (sweep_dir / ".submitit").glob("*") if p.is_dir() and p.name[0].isdigit()]
        if folders:
            return folders[0]
        time.sleep(0.1)
    pytest.fail("the job was not submitted within 60 s")


def wait_for_rows(proc: subprocess.Popen, run_dir: Path, rows: int) -> None:
    """Until losses.csv has `rows` rows: training is under way."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (run_dir / LOSSES).read_bytes().count(b"\n") > rows:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{run_dir} did not reach {rows} steps while the job ran")


# sacct states of a start that has not ended. submitit returns once a job has written its result,
# while its batch script may still be exiting and slurmdbd records the end a moment later.
UNFINISHED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUING", "STAGE_OUT"}


def accounting(job: str, wait_s: float = 60.0) -> list[str]:
    """`sacct --duplicates`: every start of the job, requeued ones too, once each has ended."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "--duplicates", "-P", "-o", "State", "-j", job],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        states = [state.split()[0] for state in out.splitlines() if state.strip()]  # "CANCELLED by 0"
        if not UNFINISHED.intersection(states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def submitit_log(sweep_dir: Path) -> str:
    """Every start's stdout and stderr (submitit's lines and the run's log)."""
    return "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").rglob("*_log.*")))


def test_a_sweep_runs_as_slurm_jobs_then_vae_plot(cluster, tmp_path):
    """No signal: the launcher's time limit is an hour."""
    sweep_dir = tmp_path / "sweep"
    started = time.perf_counter()
    code, err = finish(
        sweep(["+sweep=n_samples", "objective=jensen", "n_samples=1,4", *TINY_NO_SAMPLES], sweep_dir), sweep_dir
    )
    assert code == 0, err[-3000:]
    print(f"\n2-job sweep on SLURM: {time.perf_counter() - started:.1f} s")
    table = check_jobs(sweep_dir, 2)
    assert [(r["objective"], r["n_samples"]) for r in table] == [("jensen", "1"), ("jensen", "4")]
    array = job_id(sweep_dir).split("_")[0]
    assert accounting(array) == ["COMPLETED", "COMPLETED"]  # both array tasks ran as SLURM jobs
    result = run_cli(["vae-plot", str(sweep_dir)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_table(sweep_dir / "comparison.csv")) == 2 and (sweep_dir / "report.md").is_file()


def _stopped_then_resumed(tmp_path, overrides: list[str], stop, wait: float = WAIT) -> tuple[Path, str, float]:
    """Run overrides as a one-job sweep, stop it with stop(proc, run_dir, job) while training; meanwhile
    train the same config in-process, never stopped (the reference). Returns the sweep dir, the job id
    and the sweep's seconds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep_dir = tmp_path / "sweep"
    started = time.perf_counter()
    proc = sweep(overrides, sweep_dir)
    job = job_id(sweep_dir)
    stop(proc, sweep_dir / "0", job)
    job_keys = [o for o in overrides if not o.startswith("hydra.")]
    train(compose_config(job_keys), tmp_path / "reference")  # on the other core while the job runs
    code, err = finish(proc, sweep_dir, wait)
    assert code == 0, err[-3000:]
    assert_same_run(sweep_dir / "0", tmp_path / "reference")
    return sweep_dir, job, time.perf_counter() - started


def test_a_preempted_job_is_requeued_and_ends_as_a_run_never_stopped(cluster, tmp_path, one_thread):
    """SLURM's preemption signal (scancel --signal=USR2, as a preempting scheduler sends it) mid-training:
    sent once losses.csv has 300 rows, so the job's handlers are in place (the requeued start gets no
    signal; its time limit is an hour)."""

    def preempt(proc, run_dir, job):
        wait_for_rows(proc, run_dir, 300)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)

    overrides = [*LONG, "n_train_iters=3000", "hydra.launcher.timeout_min=60"]
    sweep_dir, job, seconds = _stopped_then_resumed(tmp_path, overrides, preempt)
    print(f"\npreempted at step >= 300 of 3000, requeued, resumed: {seconds:.1f} s")
    assert accounting(job) == ["REQUEUED", "COMPLETED"]
    log = submitit_log(sweep_dir)
    assert "this job is preempted" in log and "requeued job: resuming" in log


def _steps_per_second(tmp_path, keys: list[str]) -> float:
    """This machine's pace at the job's config, now, on one thread (the job's): a short run in-process,
    its set-up counted in, so the pace is if anything low."""
    started = time.perf_counter()
    train(compose_config([*keys, "n_train_iters=300"]), tmp_path / "pace")
    return 300 / (time.perf_counter() - started)


def test_a_timed_out_job_is_requeued_and_ends_as_a_run_never_stopped(cluster, tmp_path, one_thread):
    """timeout_min=1, signal_delay_s=20: SLURM itself signals the job about 20 s before its time limit
    (it checks limits every 30 s: the signal came 20 to 50 s after a start here). No signal can reach a
    job before it has installed its handler: submitit installs it as soon as it has unpickled the job,
    about a second after a start even under load, because the pickle names vae-train's command module,
    which imports no torch (tests/test_structure.py pins that). submitit counts the signal as a timeout,
    requeues, and the job resumes, as often as it takes.

    The job's length is set by this machine's pace, measured first: about 70 s of training, so it
    outlasts the first signal and needs two or three starts whether the machine is fast or loaded
    (CI's 2-core machine under load ran these steps at 10 a second, a quiet one at 37). Should it still
    end before SLURM's first signal, it runs again with twice the steps."""
    pace = _steps_per_second(tmp_path, SLOW)
    steps = int(min(max(70 * pace, 500), 20000))
    for attempt in range(2):
        overrides = [
            *SLOW,
            f"n_train_iters={steps}",
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=20",
            "hydra.launcher.max_num_timeout=30",
        ]
        # each start trains about 20 to 50 s, then waits for SLURM to requeue it and starts python again
        wait = WAIT + 3 * steps / pace
        sweep_dir, job, seconds = _stopped_then_resumed(tmp_path / f"try{attempt}", overrides, lambda *a: None, wait)
        starts = accounting(job)
        print(f"\n{steps} steps at {pace:.0f} a second: timed out {len(starts) - 1} times, resumed: {seconds:.1f} s")
        if len(starts) >= 2:
            break
        steps *= 2
    assert starts[-1] == "COMPLETED" and len(starts) >= 2 and set(starts[:-1]) == {"REQUEUED"}
    log = submitit_log(sweep_dir)
    assert "this job is timed-out" in log and "requeued job: resuming" in log


STOPPED = {"cancelled": "scancel", "failing": "submission"}


@pytest.mark.parametrize("how", ["cancelled", "failing"])
def test_a_cancelled_or_failing_job_ends_the_sweep_with_one_line(cluster, tmp_path, how):
    """scancel once losses.csv has 100 rows (training, its handlers in place); the failing job gets no signal."""
    sweep_dir = tmp_path / "sweep"
    if how == "cancelled":
        proc = sweep([*LONG, "n_train_iters=100000"], sweep_dir)
        job = job_id(sweep_dir)
        wait_for_rows(proc, sweep_dir / "0", 100)
        subprocess.run(["scancel", job], check=True)
    else:  # lr=1e30: the loss is NaN within a few steps, and the job stops with NonFiniteError
        proc = sweep([*LONG, "n_train_iters=1000", "lr=1e30"], sweep_dir)
        job = job_id(sweep_dir)
    started = time.perf_counter()
    code, err = finish(proc, sweep_dir)
    print(f"\n{how} job: the sweep ended {time.perf_counter() - started:.1f} s after the {STOPPED[how]}")
    assert code == 4
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("vae-cli:")]
    if how == "cancelled":
        # scancel's SIGTERM stops training at a step boundary (checkpoint written), so the line says how to resume
        assert re.match(
            rf"vae-cli: error: cluster job {job} was cancelled \(state CANCELLED by 0\): "
            rf"interrupted at step \d+ \(SIGTERM\); resume with: vae-train resume=\S+; its log: ",
            line,
        )
    else:
        assert re.match(rf"vae-cli: error: cluster job {job} failed \(state FAILED\): non-finite loss", line)
    assert f".submitit/{job}/{job}_0_log.err" in line
