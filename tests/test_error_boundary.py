"""The error boundary of vae-train, vae-eval and vae-plot for the classes of bad input a new user
tries: a size the machine cannot hold, a path that cannot be created, a broken run directory, a
config error with and without HYDRA_FULL_ERROR=1. Each gets one line naming it and exit code 2,
and nothing is written beyond what was there before."""

from __future__ import annotations

import shutil

import pytest
from helpers import TINY, compose_config, run_cli, vae_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae_cli.commands.boundary import cluster_job_error
from vae_cli.commands.evaluate import main as eval_main
from vae_cli.commands.plot import main as plot_main
from vae_cli.run.rundir import EVAL, SUMMARY
from vae_cli.stages.pipeline import train

HUGE = 100_000_000


def one_line(err: str, prog: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("key", ["n_samples", "batch_size", "model.hidden"])
def test_a_size_the_machine_cannot_hold(key):
    code, err, created = vae_train([*TINY, f"{key}={HUGE}"])
    assert code == 2 and created == [], (code, err, created)
    line = one_line(err, "vae-cli")
    assert f"{key}={HUGE}" in line and "GiB" in line and "available" in line


@pytest.mark.parametrize(
    "args, path, reason",
    [
        (["data=mnist", "data.root=/dev/null/x"], "/dev/null/x", "/dev/null is not a directory"),
        (["hydra.run.dir=/proc/nope"], "/proc/nope", "No such file or directory"),
    ],
)
def test_a_path_that_cannot_be_created(args, path, reason):
    synthetic_sizes = ("data.n_train", "data.n_test")  # keys of data=synthetic only
    code, err, created = vae_train([*(o for o in TINY if not o.startswith(synthetic_sizes)), *args])
    assert code == 2 and created == [], (code, err, created)
    line = one_line(err, "vae-cli")
    assert path in line and reason in line


def test_hydra_full_error_0_still_gets_one_line():
    code, err, _ = vae_train(["objective=foo"], env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "objective" in one_line(err, "vae-cli")


@pytest.mark.slow
def test_hydra_full_error_1_shows_the_traceback(tmp_path):
    result = run_cli(["vae-train", *TINY, "K=0"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "invalid value K=0" in result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained elbo run."""
    run_dir = tmp_path_factory.mktemp("boundary") / "run"
    train(compose_config(["objective=elbo"]), run_dir=run_dir)
    return run_dir


def call(main, args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def test_vae_eval_size_the_machine_cannot_hold(run_dir, capsys):
    code, err = call(eval_main, [str(run_dir), f"--importance-k={HUGE}", "--device=cpu"], capsys)
    assert code == 2 and f"eval.importance_k={HUGE}" in one_line(err, "vae-eval")
    assert not (run_dir / EVAL).exists()


@pytest.mark.parametrize("path", ["/dev/null/x", "/nonexistent/run"])
def test_vae_eval_a_path_that_is_no_run(path, capsys):
    code, err = call(eval_main, [path], capsys)
    assert code == 2 and path in one_line(err, "vae-eval")


def test_vae_eval_refuses_a_corrupt_summary_before_writing_anything(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / SUMMARY).write_text("{not json")
    code, err = call(eval_main, [str(broken), "--device=cpu", "--n-images=8"], capsys)
    assert code == 2 and SUMMARY in one_line(err, "vae-eval")
    assert not (broken / EVAL).exists() and (broken / SUMMARY).read_text() == "{not json"


def plot_refused(err: str) -> list[str]:
    """vae-plot's answer to paths it cannot use: one `skipped` line per path, then one error line."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("vae-plot: error: ") and "Traceback" not in err, err
    assert all(line.startswith("vae-plot: skipped ") for line in lines[:-1]), err
    return lines


def test_vae_plot_output_that_cannot_be_created(run_dir, capsys):
    code, err = call(plot_main, [str(run_dir), "--out", "/proc/nope/figures"], capsys)
    assert code == 2 and "/proc/nope/figures" in one_line(err, "vae-plot")


@pytest.mark.parametrize("main, prog", [(eval_main, "vae-eval"), (plot_main, "vae-plot")])
def test_an_unknown_option_is_one_line(main, prog, run_dir, capsys):
    code, err = call(main, [str(run_dir), "--bogus"], capsys)
    assert code == 2 and "--bogus" in one_line(err, prog)


# --- hypothesis: the same classes for vae-eval and vae-plot ------------------------------------------

JUNK = st.text(alphabet="=[]{}()$,'\" ~+:@/\\%*?abK0123456789.-_", min_size=1, max_size=10)
EVAL_OPTIONS = ["--n-images", "--importance-k", "--quadrature-points", "--prior-mc-samples", "--batch-size"]
SIZED = ["--importance-k", "--quadrature-points", "--prior-mc-samples"]  # n-images and batch-size are capped


def is_count(text: str) -> bool:
    """What argparse's int() and the checks accept: a positive integer, spaces and signs allowed."""
    try:
        return int(text) > 0
    except ValueError:
        return False


not_a_count = st.one_of(st.integers(max_value=0).map(str), JUNK.filter(lambda v: not is_count(v)))


@st.composite
def bad_eval_option(draw) -> tuple[str, str]:
    if draw(st.booleans()):
        return draw(st.sampled_from(SIZED)), str(draw(st.integers(min_value=10**11, max_value=10**15)))
    return draw(st.sampled_from(EVAL_OPTIONS)), draw(not_a_count)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=bad_eval_option())
def test_hypothesis_vae_eval_bad_option_is_one_line(bad, run_dir, capsys):
    option, value = bad
    code, err = call(eval_main, [str(run_dir), f"{option}={value}", "--device=cpu"], capsys)
    line = one_line(err, "vae-eval")
    assert code == 2 and (option in line or option[2:].replace("-", "_") in line), line
    assert not (run_dir / EVAL).exists()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.one_of(st.sampled_from(["/dev/null/x", "/proc/nope", "missing/run"]), JUNK))
def test_hypothesis_vae_plot_path_without_runs_is_one_line(path, tmp_path_factory, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("plot"))
    code, err = call(plot_main, ["--out=figures", "--", path], capsys)
    assert code == 2 and len(plot_refused(err)) == 2, err


# What submitit raised in the sweep's process for a cancelled job and for a failing one on the
# test cluster (tests/test_slurm.py runs them for real; these check the line without SLURM).
CANCELLED = """Job 9 (task: 0) with path /s/sweep/.submitit/9/9_0_result.pkl
has not produced any output (state: CANCELLED by 0)
Error stream produced:
----------------------------------------
vae_cli.errors.Abort: interrupted at step 128 (SIGTERM); resume with: vae-train resume=/s/sweep/0
slurmstepd-vm: error: *** STEP 9.0 ON vm CANCELLED AT 2026-11-22T06:40:14 ***"""
FAILED = """Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/x/submitit/core/submission.py", line 55, in process_job
ValueError: a bug
----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /s/sweep/.submitit/7_1/7_1_0_log.err
  - /s/sweep/.submitit/7_1/7_1_0_log.out"""


@pytest.mark.parametrize(
    "message, line",
    [
        (
            CANCELLED,
            "cluster job 9 was cancelled (state CANCELLED by 0): interrupted at step 128 (SIGTERM); resume with: "
            "vae-train resume=/s/sweep/0; its log: /s/sweep/.submitit/9/9_0_log.err",
        ),
        (FAILED, "cluster job 7_1 failed: ValueError: a bug; its log: /s/sweep/.submitit/7_1/7_1_0_log.err"),
    ],
)
def test_a_dead_cluster_job_is_one_line_naming_it(message, line):
    error = cluster_job_error(RuntimeError(message))
    assert error.exit_code == 4
    assert str(error) == line + " (other jobs of the sweep, if any, keep running: squeue)"
