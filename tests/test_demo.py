"""The demo fits the machine: the CPU hint never proposes the experiment that is running, a
multirun's job estimates the sweep's total after its first steps, and a sweep stopped with Ctrl-C
(vae-train -m, make demo) still compares the runs that finished and names the command that draws them."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, at_step, compose_config, read_table, skip_figures
from hydra.core.global_hydra import GlobalHydra

from vae_cli.commands.train import main as train_main
from vae_cli.stages.training import CpuHint, Place, cpu_hint

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_hint_never_proposes_the_experiment_that_is_running(monkeypatch):
    monkeypatch.setattr("vae_cli.stages.training.cpu_has_bf16", lambda: False)
    cfg = compose_config([], tiny=False)
    assert "+experiment=demo" in cpu_hint(cfg, 1000)
    in_demo = cpu_hint(cfg, 1000, Place(experiment="demo", job=0, jobs=3))
    assert "+experiment=demo" not in in_demo and "objective.shared_samples=true" in in_demo
    shared = compose_config(["objective.shared_samples=true"], tiny=False)
    assert (
        cpu_hint(shared, 1000, Place(experiment="demo"))
        == "on the CPU this run needs about 17 min more for its 1000 steps"
    )


def test_a_sweeps_job_estimates_the_sweeps_total_after_its_first_steps(caplog):
    cfg = compose_config(["n_train_iters=100"])
    hint = CpuHint(cfg, torch.device("cpu"), 0, Place(experiment="demo", job=0, jobs=3))
    with caplog.at_level(logging.INFO):
        for step, now in enumerate([10.0, 11.0, 12.0, 13.0, 14.0, 15.0], start=1):  # 1 s a step after the first
            hint.after(step, now)
    (line,) = [r.getMessage() for r in caplog.records if "run 1 of 3" in r.getMessage()]
    assert line.startswith("the demo: run 1 of 3 needs about 2 min more for its 100 steps; the 2 runs after it")
    assert "about 5 min of training left in all" in line  # 96 s + 2 x 100 s
    assert CpuHint(cfg, torch.device("cuda"), 0, Place(job=1, jobs=2)).done is False  # on any device


def run_vae_train(args: list[str], cwd: Path) -> tuple[int, str]:
    """`vae-train ARGS` in-process in cwd: (exit code, stderr)."""
    saved_argv, saved_env, here = sys.argv, dict(os.environ), os.getcwd()
    err = io.StringIO()
    os.chdir(cwd)
    sys.argv = ["vae-train", *args]
    for key in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR", "OMP_NUM_THREADS"):
        os.environ.pop(key, None)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err):
            train_main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
        os.chdir(here)
        torch.set_num_threads(threads)
    return code, err.getvalue()


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handling, also where the tests run as a background job (SIGINT ignored)."""
    outer = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def test_a_multirun_stopped_with_ctrl_c_compares_the_runs_that_finished(tmp_path, monkeypatch, default_sigint):
    skip_figures(monkeypatch)
    at_step(monkeypatch, 8, lambda: os.kill(os.getpid(), signal.SIGINT))  # the second job's third step
    code, err = run_vae_train(["-m", *TINY, "objective=jensen,elbo", "hydra.sweep.dir=sweep"], tmp_path)
    assert code == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith("vae-cli: interrupted at step 3 (SIGINT); resume with: vae-train resume=")
    assert line.endswith("the sweep stopped: compare and draw the runs that finished with: vae-plot sweep")
    table = read_table(tmp_path / "sweep" / "comparison.csv")
    assert [(row["run"], row["status"]) for row in table][0] == ("0", "completed")
    log = (tmp_path / "sweep" / "0" / "train.log").read_text()
    assert "this sweep: run 1 of 2 needs about" in log  # the estimate after the first steps
    assert "torch threads: " in log
    # the next command in this process is no sweep: its interrupt line names no sweep
    at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    code, err = run_vae_train([*TINY, "hydra.run.dir=single"], tmp_path)
    assert code == 130 and "sweep" not in err.strip().splitlines()[-1]


FAKE_TRAIN = """#!/bin/sh
# stands in for vae-train -m: makes the sweep directory, then waits for Ctrl-C and exits 130 as vae-train does
for arg; do case $arg in hydra.sweep.dir=*) dir=${arg#hydra.sweep.dir=};; esac; done
mkdir -p "$dir/0" && echo started > "$dir/started"
trap 'echo "vae-cli: interrupted (SIGINT)" >&2; exit 130' INT
while :; do sleep 0.1; done
"""
FAKE_PLOT = """#!/bin/sh
echo "vae-plot: report -> $1/report.md"; echo drawn > "$1/plotted"
"""


def test_make_demo_stopped_with_ctrl_c_still_draws_the_report(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".vae-cli-installed").touch()
    for name, text in (("vae-train", FAKE_TRAIN), ("vae-plot", FAKE_PLOT)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    demo_dir = tmp_path / "demo"
    command = ["make", "-s", "-C", str(ROOT), "-o", str(venv / ".vae-cli-installed"), "demo"]
    command += [f"VENV={venv}", f"DEMO_DIR={demo_dir}"]
    make = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    for _ in range(600):  # until the fake vae-train is running (at most a minute)
        if (demo_dir / "started").exists() or make.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(make.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    out, _ = make.communicate(timeout=60)
    assert (demo_dir / "plotted").exists(), out
    assert f"make demo: stopped; the report of the runs that finished is {demo_dir}/report.md" in out
    assert make.returncode != 0  # make still says that it was interrupted
