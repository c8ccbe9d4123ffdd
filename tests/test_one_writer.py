"""One writer per run directory, and run directories on read-only file systems.

A process that trains (a fresh run, resume=, a requeued job) or evaluates (vae-eval) holds an
flock on RUN_DIR/.lock for its whole life; a second writer is refused in one line naming the
holder, and the kernel frees the run when the holder dies, kill -9 too. Where the file system
cannot lock, the run goes on with a warning. A run directory or data root on a read-only file
system is refused in one line before any work."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, TINY, Crash, assert_same_run, at_step, compose_config, crash, run_cli, skip_figures

from vae_cli.commands.evaluate import main as eval_main
from vae_cli.errors import Interrupted, RunDirError
from vae_cli.run import rundir
from vae_cli.run.rundir import LOCK, LOSSES, SUMMARY, RunLock
from vae_cli.stages.pipeline import train

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bitwise equality needs the same thread count
# Enough tiny steps (about 400 a second on one core) that a run is still training when the others start.
LONG = [
    *(o for o in TINY if not o.startswith(("n_train_iters=", "model.hidden="))),
    "model.hidden=32",
    "n_train_iters=4000",
    "checkpoint_every=50",
]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR")}
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / "vae-train"), *args], stdout=out, stderr=subprocess.STDOUT, env={**env, **ONE_THREAD}
        )


def rows(run_dir: Path) -> int:
    try:
        return max(0, (run_dir / LOSSES).read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def wait_for_rows(proc: subprocess.Popen, run_dir: Path, n: int) -> None:
    deadline = time.monotonic() + 240
    while rows(run_dir) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and rows(run_dir) >= n, f"the run did not reach {n} steps while running"


def assert_unlocked(run_dir: Path) -> None:
    """Nobody holds the run: this process can take its lock (a still-open descriptor of its own would stop it too)."""
    RunLock.acquire(run_dir, "test").release()


@pytest.mark.slow
def test_two_writers_the_second_refused_then_concurrent_resumes_after_kill_9(tmp_path, one_thread, monkeypatch, capsys):
    skip_figures(monkeypatch)
    train(compose_config(LONG), tmp_path / "reference")  # in-process, never stopped
    run_dir = tmp_path / "run"
    first = start([*LONG, f"hydra.run.dir={run_dir}"], tmp_path / "first.txt")
    wait_for_rows(first, run_dir, 200)
    first.send_signal(signal.SIGSTOP)  # stopped, it holds the run still, however slow the others start

    second = run_cli(["vae-train", f"resume={run_dir}"], cwd=tmp_path)  # while the first trains
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert re.match(
        rf"vae-cli: error: {re.escape(str(run_dir))} is in use by pid {first.pid} on host \S+ since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(vae-train\): one process writes into a run at a time",
        second.stderr,
    ), second.stderr
    with pytest.raises(SystemExit) as info:
        eval_main(
            [str(run_dir), "--device", "cpu"]
        )  # vae-eval would write eval.json into the run: refused the same way
    assert info.value.code == 2 and f"in use by pid {first.pid}" in capsys.readouterr().err

    first.send_signal(signal.SIGKILL)  # the kernel frees the lock with the process
    first.wait(timeout=60)
    both = [start([f"resume={run_dir}"], tmp_path / f"resume{i}.txt") for i in (1, 2)]
    codes = sorted(proc.wait(timeout=600) for proc in both)
    logs = [(tmp_path / f"resume{i}.txt").read_text() for i in (1, 2)]
    assert codes == [0, 2], logs
    (refused,) = [log for proc, log in zip(both, logs) if proc.returncode == 2]
    (line,) = refused.strip().splitlines()[-1:]
    # Started together, the second finds the first training (or, on a machine slow enough to start it
    # after the whole run, finds the run complete): one line either way, and nothing written.
    assert re.match(rf"vae-cli: error: {re.escape(str(run_dir))} is (in use by pid \d+|complete at step)", line), line
    assert "Traceback" not in refused
    assert_same_run(run_dir, tmp_path / "reference")
    assert_unlocked(run_dir)


@pytest.mark.parametrize("how", ["end", "exception", "SIGINT", "SIGTERM", "preemption"])
def test_the_lock_is_released_on_every_exit_path(how, tmp_path, monkeypatch):
    skip_figures(monkeypatch)
    run_dir = tmp_path / "run"
    cfg = compose_config(["n_train_iters=6", "checkpoint_every=2"])
    outer = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if how == "end":
            train(cfg, run_dir)
        elif how == "exception":
            with monkeypatch.context() as mp:
                at_step(mp, 4, crash)
                with pytest.raises(Crash):
                    train(cfg, run_dir)
        elif how in ("SIGINT", "SIGTERM"):
            with monkeypatch.context() as mp:
                at_step(mp, 4, lambda: os.kill(os.getpid(), getattr(signal, how)))
                with pytest.raises(Interrupted):
                    train(cfg, run_dir)
        else:  # submitit's handler (a stand-in) requeues and exits after the checkpoint

            def submitit_handler(signum, frame):
                raise SystemExit(-1)

            monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
            signal.signal(signal.SIGUSR2, submitit_handler)
            with monkeypatch.context() as mp:
                at_step(mp, 4, lambda: os.kill(os.getpid(), signal.SIGUSR2))
                with pytest.raises(SystemExit):
                    train(cfg, run_dir)
    finally:
        for sig, handler in outer.items():
            signal.signal(sig, handler)
    assert_unlocked(run_dir)
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()  # who held it last


def test_a_held_run_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(["n_train_iters=2"])
    with RunLock.acquire(run_dir, "another vae-train"):
        with pytest.raises(RunDirError, match=rf"{re.escape(str(run_dir))} is in use by pid {os.getpid()} .*another"):
            train(cfg, run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written beside the holder's lock
    train(cfg, run_dir)  # freed: the run goes ahead
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "completed"


def test_a_lock_file_taken_back_while_another_process_opens_it_is_not_a_second_lock(tmp_path, monkeypatch):
    """A refused run unlinks the lock file it made; a process that opened that file just before and
    then locks it holds the lock of a file with no name, which a third process would not see: it
    finds the name gone (or another file under it) and locks the file that has the name."""
    run_dir = tmp_path / "run"
    real, opened = rundir._open_lock_file, []

    def racing(path):
        fd, created = real(path)
        if not opened:
            path.unlink()  # the refused run's forget(), between this open and the flock
        opened.append(created)
        return fd, created

    monkeypatch.setattr(rundir, "_open_lock_file", racing)
    with RunLock.acquire(run_dir, "vae-train") as lock:
        assert lock.held and opened == [True, True]  # the unlinked file was let go, the new one locked
        monkeypatch.setattr(rundir, "_open_lock_file", real)
        with pytest.raises(RunDirError, match="in use by"):  # the file with the name is the held one
            RunLock.acquire(run_dir, "a third writer")
    assert_unlocked(run_dir)


def test_a_run_directory_named_with_dot_dot_is_one_run(tmp_path):
    """hydra.run.dir=sub/../run and resume=sub/../run name the run Hydra writes into (its
    output_dir has the `..` taken out): the process's own lock never refuses it."""
    (tmp_path / "sub").mkdir()
    first = run_cli(["vae-train", *TINY, "n_train_iters=4", "eval.enabled=false", "hydra.run.dir=sub/../run"], tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_cli(["vae-train", "resume=sub/../run", "n_train_iters=6"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["steps"] == 6


def test_a_file_system_that_cannot_lock_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some network file systems answer flock with ENOLCK: the run is not refused (the user could do
    nothing about it); it warns, and summary.json says the run held no lock."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    skip_figures(monkeypatch)
    summary = train(compose_config(["n_train_iters=2"]), tmp_path / "run")
    assert summary["status"] == "completed" and summary["lock"].startswith("none (")
    assert "No locks available" in summary["lock"]
    assert any("nothing stops a second writer" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / LOCK).exists()


# --- read-only file systems ----------------------------------------------------------------------------


def mount(folder: Path, *options: str) -> None:
    subprocess.run(["mount", *options, str(folder)], check=True, capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    """A tmpfs holding a trained run and an empty folder, remounted read-only: what root cannot write either."""
    folder = tmp_path / "ro"
    folder.mkdir()
    try:
        mount(folder, "-t", "tmpfs", "-o", "size=64m", "tmpfs")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("mounting a read-only tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        mp = pytest.MonkeyPatch()
        skip_figures(mp)
        cfg = compose_config(["n_train_iters=4", "checkpoint_every=2", "eval.enabled=false"])
        train(cfg, folder / "run")
        mp.undo()
        summary = json.loads((folder / "run" / SUMMARY).read_text())
        summary["status"] = "interrupted"  # a stopped run, so that resume= has something to do
        (folder / "run" / SUMMARY).write_text(json.dumps(summary))
        (folder / "empty").mkdir()
        mount(folder, "-o", "remount,ro")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_run_directories_and_data_roots_get_one_line(read_only, tmp_path, capsys):
    run_dir = read_only / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    cases = [
        (["vae-train", f"resume={run_dir}", "n_train_iters=8"], run_dir),
        (["vae-train", *TINY, f"hydra.run.dir={read_only / 'empty' / 'new'}"], read_only / "empty" / "new"),
        (
            [
                "vae-train",
                *(o for o in TINY if not o.startswith("data.n_")),
                "data=mnist",
                f"data.root={read_only / 'empty'}",
                f"hydra.run.dir={tmp_path / 'fresh'}",
            ],
            read_only / "empty",
        ),  # fmt: skip
        (["vae-eval", str(run_dir), "--device", "cpu"], run_dir),
        (["vae-plot", str(run_dir)], run_dir),
    ]
    for args, path in cases:
        result = run_cli(args, cwd=tmp_path)
        line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert str(path) in line and "Read-only file system" in line, (args, line)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "outputs").exists()
