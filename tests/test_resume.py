"""Runs that survive: resume after SIGKILL, SIGINT, SIGTERM and preemption bit for bit, and the
non-finite-loss guard.

SIGKILL lands on real processes at random steps: training children forked from the test (three
seeds, two kills each, no import cost) and one `vae-train` console-script chain (SIGKILL, then
SIGTERM, resumed with `vae-train resume=`). In-process tests crash train() at more points
(between steps, mid-row of losses.csv, mid-write of checkpoint.pt, just after a checkpoint) and
signal it. Every resumed run must end with the parameters, optimizer state, RNG state and
losses.csv of the run that was never stopped: torch.equal and byte for byte.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, TINY, Crash, assert_same_run, compose_config, run_cli, skip_figures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import vae_cli.run.checkpoint
import vae_cli.run.rundir
import vae_cli.stages.evaluation
import vae_cli.stages.figures
import vae_cli.stages.training
from vae_cli.commands.callbacks import changed_keys
from vae_cli.errors import Interrupted, NonFiniteError, RunDirError
from vae_cli.maths.objectives import OBJECTIVES, Loss, Objective
from vae_cli.run.checkpoint import load_checkpoint
from vae_cli.run.rundir import CHECKPOINT, EVAL, LOCK, LOSSES, SUMMARY, read_json
from vae_cli.stages.pipeline import prepare, train

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

# Tiny, but with enough steps that a poll of losses.csv can stop it part way.
KILL_RUN = ["model.hidden=32", "n_samples=16", "batch_size=32", "n_train_iters=60", "eval.enabled=false"]
IN_PROCESS = ["n_train_iters=12", "checkpoint_every=3", "eval.enabled=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bitwise equality needs the same thread count


@pytest.fixture
def default_signals():
    """Python's own SIGINT and SIGTERM handling, also where the tests run as a background job
    (which starts with SIGINT ignored, and a run leaves an ignored signal alone)."""
    outer = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in outer.items():
        signal.signal(sig, handler)


@pytest.fixture
def no_figures(monkeypatch):
    """The figures are not part of the state compared here; drawing them costs seconds."""
    skip_figures(monkeypatch)


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose_config(list(overrides))


def config(overrides: list[str], resume: Path | None = None):
    """compose_config(overrides), composed once per set of overrides (Hydra's compose costs)."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    if resume is not None:
        cfg.resume = str(resume)
    return cfg


def resume_cfg(run_dir: Path, overrides: list[str] = ()):
    """What `vae-train resume=RUN_DIR OVERRIDES` composes; the saved config is the run's."""
    return config(list(overrides), resume=run_dir)


# --- SIGKILL of real training processes ----------------------------------------------------------


def rows(run_dir: Path) -> int:
    try:
        return max(0, (run_dir / LOSSES).read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    with open(log, "w") as out:
        return subprocess.Popen([str(BIN / "vae-train"), *args], stdout=out, stderr=subprocess.STDOUT, env=env)


class Child:
    """train() in a forked child process: a real process that SIGKILL stops wherever it is, without
    the seconds of imports a console-script subprocess costs. (One thread: forking is safe.)"""

    def __init__(self, cfg, run_dir: Path):
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                train(cfg, run_dir=run_dir, changed=[])
                code = 0
            finally:
                os._exit(code)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.returncode


def stop_at(proc, run_dir: Path, step: int, sig: int) -> int:
    """Send sig once losses.csv has `step` rows (or the run ended first); the rows when sent."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and rows(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.001)
    at = rows(run_dir)
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=240)
    return at


def next_target(rng: random.Random, run_dir: Path, n: int, stops_left: int) -> int:
    """A random step beyond the rows already there (the signal must find the new process in its
    loop), early enough to leave room for the stops after this one, and never in the last quarter:
    a test process the loaded machine wakes late still finds the run going."""
    done = rows(run_dir)
    return rng.randint(done + 1, done + max(1, (n - n // 4 - done) // stops_left))


# seed: the run's overrides; each seed's run is SIGKILLed twice, resumed each time, then finished.
FORKED = {
    0: ["objective=jensen", "checkpoint_every=3"],
    1: ["objective=iwae", "data.binarization=dynamic", "checkpoint_every=1"],
    2: ["objective=prior_iwae", "checkpoint_every=5"],
}


@pytest.mark.parametrize("seed", sorted(FORKED))
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted_run(seed, tmp_path, one_thread, no_figures):
    overrides = [*KILL_RUN, *FORKED[seed], f"seed={seed}"]
    train(config(overrides), run_dir=tmp_path / "reference")
    run_dir, rng = tmp_path / "killed", random.Random(seed)
    n, kills = config(overrides).n_train_iters, []
    cfg = config(overrides)
    for stops_left in (2, 1):
        target = next_target(rng, run_dir, n, stops_left)
        child = Child(cfg, run_dir)
        kills.append(stop_at(child, run_dir, target, signal.SIGKILL))
        assert child.returncode == -signal.SIGKILL, f"the run ended before the kill at step {target}"
        cfg = resume_cfg(run_dir)
    train(cfg, run_dir=run_dir, changed=[])
    assert_same_run(run_dir, tmp_path / "reference")
    print(f"seed {seed}: SIGKILL after {kills} rows of {n}")  # counted in the closing note


@pytest.mark.slow
def test_console_script_sigkill_then_resume_equals_uninterrupted_run(tmp_path, one_thread, no_figures):
    """The same through the console scripts: `vae-train` SIGKILLed at a random step, then
    `vae-train resume=RUN_DIR` to the end. (SIGINT and SIGTERM through train_main: below.)"""
    overrides = [*KILL_RUN, "objective=elbo", "checkpoint_every=4", "seed=3"]
    train(config(overrides), run_dir=tmp_path / "reference")
    run_dir, n = tmp_path / "killed", config(overrides).n_train_iters
    proc = start([*TINY, *overrides, f"hydra.run.dir={run_dir}"], tmp_path / "first.txt")
    at = stop_at(proc, run_dir, next_target(random.Random(3), run_dir, n, 1), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.txt").read_text()
    print(f"console script: SIGKILL after {at} rows of {n}")  # counted in the closing note
    original_config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    proc = start([f"resume={run_dir}"], tmp_path / "resumed.txt")
    output = (tmp_path / "resumed.txt").read_text() if proc.wait(timeout=240) else ""
    assert proc.returncode == 0 and "Traceback" not in output, output
    assert_same_run(run_dir, tmp_path / "reference")
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == original_config
    assert len(list((run_dir / ".hydra").glob("resume-*"))) == 1  # the resumed run's Hydra files, beside the original


# --- crashes and signals in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted in-process run every crash test compares with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    skip_figures(mp)
    try:
        train(config(IN_PROCESS), run_dir=run_dir)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return run_dir


def crash_at(monkeypatch, step: int, where: str) -> None:
    """Make train() raise Crash at `where` of step `step`."""
    real_step, real_write = vae_cli.stages.training.train_step, vae_cli.run.checkpoint.atomic_write_bytes
    real_append = vae_cli.run.rundir.LossLog.append

    if where == "before_step":
        calls = iter(range(1, 10**6))

        def train_step(*args, **kwargs):
            if next(calls) == step:
                raise Crash
            return real_step(*args, **kwargs)

        monkeypatch.setattr(vae_cli.stages.training, "train_step", train_step)
    elif where == "torn_row":

        def append(self, row):
            if row["step"] == step:
                line = ",".join(vae_cli.run.rundir._format(row[c]) for c in self.columns) + "\n"
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                raise Crash
            real_append(self, row)

        monkeypatch.setattr(vae_cli.run.rundir.LossLog, "append", append)
    elif where in ("mid_checkpoint", "after_checkpoint"):

        def write(path, data):
            path = Path(path)
            if path.name == CHECKPOINT and torch.load(io.BytesIO(data), weights_only=True)["step"] >= step:
                if where == "mid_checkpoint":  # the temp file half written, never renamed
                    (path.parent / f".{path.name}.tmp-{os.getpid()}").write_bytes(data[: len(data) // 2])
                    raise Crash
                real_write(path, data)
                raise Crash
            real_write(path, data)

        monkeypatch.setattr(vae_cli.run.checkpoint, "atomic_write_bytes", write)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    step=st.integers(1, 12), where=st.sampled_from(["before_step", "torn_row", "mid_checkpoint", "after_checkpoint"])
)
def test_crash_anywhere_then_resume_equals_uninterrupted_run(
    step, where, reference, tmp_path_factory, one_thread, no_figures
):
    run_dir = tmp_path_factory.mktemp("crash")
    with pytest.MonkeyPatch.context() as mp:
        crash_at(mp, step, where)
        with pytest.raises(Crash):
            train(config(IN_PROCESS), run_dir=run_dir)
    train(resume_cfg(run_dir), run_dir=run_dir, changed=[])
    assert_same_run(run_dir, reference)
    assert not list(run_dir.glob(".*.tmp-*"))


def test_killed_before_step_0_checkpoint_restarts_from_hydra_config(reference, tmp_path, one_thread, no_figures):
    """A run killed while loading data has only .hydra/config.yaml: resume starts it from step 0."""
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(config(IN_PROCESS), tmp_path / ".hydra" / "config.yaml")
    train(resume_cfg(tmp_path), run_dir=tmp_path, changed=[])
    assert_same_run(tmp_path, reference)


def signal_at(monkeypatch, step: int, sig: int) -> None:
    real_step = vae_cli.stages.training.train_step
    calls = iter(range(1, 10**6))

    def train_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if next(calls) == step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(vae_cli.stages.training, "train_step", train_step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_says_how_to_resume(
    sig, reference, tmp_path, monkeypatch, one_thread, no_figures, default_signals
):
    with monkeypatch.context() as mp:
        signal_at(mp, 5, sig)
        with pytest.raises(Interrupted) as info:
            train(config(IN_PROCESS), run_dir=tmp_path)
    assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # handler restored
    name = signal.Signals(sig).name
    assert info.value.exit_code == 128 + sig
    assert str(info.value) == f"interrupted at step 5 ({name}); resume with: vae-train resume={tmp_path}"
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 5
    assert rows(tmp_path) == 5
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert (summary["status"], summary["steps"], summary["signal"]) == ("interrupted", 5, name)
    train(resume_cfg(tmp_path), run_dir=tmp_path, changed=[])
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("at_step", [7, 12])  # 12: during the last step, whose checkpoint is the final one
def test_preempted_submitit_job_checkpoints_requeues_and_resumes(
    at_step, reference, tmp_path, monkeypatch, one_thread, no_figures
):
    """Submitit's USR2 handler (here a stand-in that records the call and exits like submitit's)
    runs after the checkpoint; the requeued job, same config, same directory, resumes by itself.
    Once the run is done, the job ignores the signal: one arriving while the process exits would
    kill a finished job."""
    calls = []

    def submitit_handler(signum, frame):
        calls.append(load_checkpoint(tmp_path / CHECKPOINT)["step"])
        raise SystemExit(-1)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with monkeypatch.context() as mp:
            signal_at(mp, at_step, signal.SIGUSR2)
            with pytest.raises(SystemExit):
                train(config(IN_PROCESS), run_dir=tmp_path)
        assert calls == [at_step]
        summary = json.loads((tmp_path / SUMMARY).read_text())
        assert (summary["status"], summary["steps"]) == ("preempted", at_step)
        train(config(IN_PROCESS), run_dir=tmp_path)  # the requeued job: no resume= needed
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert_same_run(tmp_path, reference)
    with pytest.raises(RunDirError, match="complete"):  # a finished run is never trained over
        train(config(IN_PROCESS), run_dir=tmp_path)


def test_requeued_job_directory_is_the_same_after_pickling():
    """Hydra's submitit launcher requeues itself (a DelayedSubmission of the same callable and
    arguments); its pickled config keeps the resolver cache, so the job lands in the same
    sweep directory even though ${now:} is later."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vae_cli.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
        fresh = compose(config_name="config", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    first = str(cfg.hydra.sweep.dir)
    time.sleep(1.1)
    requeued = pickle.loads(pickle.dumps(cfg))
    OmegaConf.copy_cache(from_config=requeued, to_config=fresh)  # what load_sweep_config does
    assert str(fresh.hydra.sweep.dir) == first
    launcher = LocalLauncher(submitit_folder=str(Path("unused")))
    delayed = launcher.checkpoint(["K=2"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    assert delayed.function is launcher and delayed.args[0] == ["K=2"]


def test_fresh_run_refuses_an_occupied_directory(reference, tmp_path):
    before = sorted(p.name for p in reference.iterdir())
    with pytest.raises(RunDirError, match="resume="):
        train(config(IN_PROCESS), run_dir=reference)
    assert sorted(p.name for p in reference.iterdir()) == before


# --- extending and overrides on resume ------------------------------------------------------------


def test_extend_a_finished_run_equals_a_longer_run(tmp_path, one_thread, no_figures):
    """n_train_iters=12 then resume with n_train_iters=20 == one run of 20 steps (same seed)."""
    long = config([*IN_PROCESS, "n_train_iters=20"])
    train(long, run_dir=tmp_path / "long")
    train(config(IN_PROCESS), run_dir=tmp_path / "extended")
    cfg = resume_cfg(tmp_path / "extended", ["n_train_iters=20"])
    summary = train(cfg, run_dir=tmp_path / "extended", changed=["n_train_iters"])
    assert summary["steps"] == 20
    assert_same_run(tmp_path / "extended", tmp_path / "long")


@pytest.mark.parametrize(
    "override, refused",
    [
        ("K=3", "K"),
        ("objective=elbo", "objective.name"),
        ("lr=0.5", "lr"),
        ("seed=1", "seed"),
        ("batch_size=8", "batch_size"),
        ("n_samples=2", "n_samples"),
        ("model.hidden=8", "model.hidden"),
        ("data.binarization=dynamic", "data.binarization"),
        ("data=mnist", "data.name"),
    ],
)
def test_resume_refuses_overrides_that_change_the_run(override, refused, reference):
    before = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    cfg = resume_cfg(reference, [override])
    with pytest.raises(Exception) as info:
        prepare(cfg, reference, changed_keys([override]))
    message = str(info.value)
    assert message.startswith(f"cannot change {refused} when resuming") and "\n" not in message
    assert {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()} == before


def test_a_resume_override_the_runs_own_choice_lacks_is_one_line_and_writes_nothing(reference):
    """data.root may change on resume, but this run's data (synthetic) has no root: one line, exit 2,
    no .hydra of the refused command, no train.log line (the lock file names its last holder)."""

    def files() -> dict:
        return {
            p.relative_to(reference): p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != LOCK
        }

    before = files()
    result = run_cli(["vae-train", f"resume={reference}", "data.root=/elsewhere"], cwd=reference.parent)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (
        result.stderr.startswith("vae-cli: error: unknown key data.root='/elsewhere'")
        and "no data.root" in result.stderr
    )
    assert files() == before


def test_resume_keeps_the_saved_config_and_applies_allowed_overrides(reference):
    overrides = ["n_train_iters=30", "checkpoint_every=5", "progress=true", "K=2", "eval.n_images=7"]
    start = prepare(resume_cfg(reference, overrides), reference, changed_keys(overrides))
    saved = load_checkpoint(reference / CHECKPOINT)["config"]
    assert (start.cfg.n_train_iters, start.cfg.checkpoint_every, start.cfg.progress, start.cfg.eval.n_images) == (
        30,
        5,
        True,
        7,
    )
    for key in ("K", "lr", "seed", "n_samples", "batch_size", "model", "objective"):
        assert OmegaConf.to_container(start.cfg)[key] == saved[key]


def test_resume_refuses_a_shorter_run_and_a_complete_one(reference):
    with pytest.raises(Exception, match="already at step 12"):
        prepare(resume_cfg(reference, ["n_train_iters=5"]), reference, ["n_train_iters"])
    with pytest.raises(RunDirError, match="complete at step 12"):
        prepare(resume_cfg(reference), reference, [])


# --- non-finite loss or gradient -------------------------------------------------------------------


def poisoned(name: str, at_call: int, where: str) -> Objective:
    real = OBJECTIVES[name]
    calls = iter(range(1, 10**6))

    def fn(model, x, n_samples, **options):
        out = real.fn(model, x, n_samples, **options)
        if next(calls) != at_call:
            return out
        if where == "term":
            return Loss(out.loss, {**out.terms, next(iter(real.terms)): torch.tensor(float("inf"))})
        weight = model.decoder.net[0].weight  # sqrt(|w - w|): value 0, gradient NaN
        return Loss(out.loss + (weight - weight.detach()).abs().sqrt().sum(), out.terms)

    return dataclasses.replace(real, fn=fn)


@pytest.mark.parametrize("where, term", [("term", "lme = inf"), ("gradient", "gradient of decoder.net.0.weight")])
def test_non_finite_stops_with_step_and_term_and_keeps_last_good_checkpoint(
    where, term, tmp_path, monkeypatch, no_figures
):
    monkeypatch.setitem(OBJECTIVES, "jensen", poisoned("jensen", 8, where))
    with pytest.raises(NonFiniteError) as info:
        train(config(IN_PROCESS), run_dir=tmp_path)
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    assert (
        message.startswith(f"non-finite {term}") and "at step 8" in message and "checkpoint of step 6 kept" in message
    )
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["step"] == 6 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert rows(tmp_path) == 7
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert (summary["status"], summary["failed_step"], summary["checkpoint_step"]) == ("failed", 8, 6)
    assert summary["failed_term"].startswith(term)


def test_cli_reports_interrupt_and_non_finite_as_one_line(tmp_path, monkeypatch, capsys, no_figures, default_signals):
    """The console script's exit codes and lines, in-process: 3 for a non-finite loss, 130 for
    SIGINT and 143 for SIGTERM (the checkpoint written, one line with the command that resumes)."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from vae_cli.commands.train import main as train_main

    def run(args):
        monkeypatch.setattr(sys, "argv", ["vae-train", *TINY, *IN_PROCESS, *args, "hydra/job_logging=disabled"])
        try:
            with pytest.raises(SystemExit) as info:
                train_main()
        finally:
            GlobalHydra.instance().clear()
        return info.value.code, capsys.readouterr().err.strip()

    with monkeypatch.context() as mp:
        mp.setitem(OBJECTIVES, "jensen", poisoned("jensen", 2, "term"))
        code, err = run([f"hydra.run.dir={tmp_path / 'nan'}"])
    assert code == 3 and err.startswith("vae-cli: error: non-finite lme = inf at step 2") and "\n" not in err
    for sig, code_expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run_dir = tmp_path / signal.Signals(sig).name
        with monkeypatch.context() as mp:
            signal_at(mp, 4, sig)
            code, err = run([f"hydra.run.dir={run_dir}"])
        name = signal.Signals(sig).name
        assert (
            code == code_expected
            and err == f"vae-cli: interrupted at step 4 ({name}); resume with: vae-train resume={run_dir}"
        )
        assert load_checkpoint(run_dir / CHECKPOINT)["step"] == 4 and rows(run_dir) == 4


# --- kills after training: figures and evaluation ---------------------------------------------------

LATER_STAGES = [
    "n_train_iters=6",
    "checkpoint_every=3",
    "eval.enabled=true",
    "eval.quadrature_points=256",
    "eval.importance_k=8",
    "eval.iwae_k=4",
    "eval.prior_mc_samples=32",
]


@pytest.mark.parametrize("stage, status", [("figures", "trained"), ("evaluate", "drawn")])
def test_kill_during_figures_or_evaluation_is_finished_by_resume(stage, status, tmp_path):
    """The status says which stages remain: resume draws and evaluates without training again."""
    target = (vae_cli.stages.figures, "draw_run") if stage == "figures" else (vae_cli.stages.evaluation, "evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(*target, lambda *a, **k: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            train(config(LATER_STAGES), run_dir=tmp_path)
    assert read_json(tmp_path / SUMMARY)["status"] == status and not (tmp_path / EVAL).exists()
    trained = {name: (tmp_path / name).read_bytes() for name in (LOSSES, CHECKPOINT)}
    summary = train(resume_cfg(tmp_path), run_dir=tmp_path, changed=[])
    assert summary["status"] == "completed" and summary["log_px_estimator"] == "quadrature"
    assert read_json(tmp_path / EVAL)["n_images"] == 64 and (tmp_path / "means.png").exists()
    assert {name: (tmp_path / name).read_bytes() for name in trained} == trained  # not trained again
    with pytest.raises(RunDirError, match="complete"):
        prepare(resume_cfg(tmp_path), tmp_path, [])


def test_exact_crash_then_resume_equals_uninterrupted_run(tmp_path, one_thread, no_figures):
    exact = [*IN_PROCESS, "objective=exact", "objective.grid_points=8"]
    train(config(exact), run_dir=tmp_path / "reference")
    with pytest.MonkeyPatch.context() as mp:
        crash_at(mp, 7, "torn_row")
        with pytest.raises(Crash):
            train(config(exact), run_dir=tmp_path / "crashed")
    train(resume_cfg(tmp_path / "crashed"), run_dir=tmp_path / "crashed", changed=[])
    assert_same_run(tmp_path / "crashed", tmp_path / "reference")
