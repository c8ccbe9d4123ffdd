"""The real console scripts in subprocesses, and the wheel installed into a fresh venv."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from vae_cli.run import keys

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-cli: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0]


def test_vae_train_runs_and_writes_its_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["vae-train", *TINY, "eval.enabled=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in (
        ".hydra/config.yaml",
        "losses.csv",
        "loss.png",
        "samples.png",
        "means.png",
        "checkpoint.pt",
        "summary.json",
        "train.log",
    ):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert "final loss" in (run_dir / "train.log").read_text()


def test_multirun_writes_one_run_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "vae-train",
            "-m",
            *TINY,
            "eval.enabled=false",
            "objective=jensen,elbo",
            "n_samples=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(4)]
    assert sorted((s["objective"], s["n_samples"]) for s in summaries) == [
        ("elbo", 1),
        ("elbo", 2),
        ("jensen", 1),
        ("jensen", 2),
    ]


def test_bad_value_gets_one_line_and_writes_nothing(tmp_path):
    proc = run_cli(["vae-train", *TINY, "K=0"], cwd=tmp_path)
    assert_clean_failure(proc, "K=0", ">= 1")
    assert list(tmp_path.iterdir()) == []


def test_bad_sweep_value_is_refused_before_any_job_runs(tmp_path):
    proc = run_cli(["vae-train", "-m", *TINY, "n_samples=2,0"], cwd=tmp_path)
    assert_clean_failure(proc, "n_samples=0")
    assert list(tmp_path.iterdir()) == []


def test_wheel_ships_the_configs(tmp_path):
    """Build the wheel, install it into a fresh venv, run vae-train --cfg job outside the checkout."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    wheel = next(wheels.glob("vae_cli-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The dependencies (torch, hydra, ...) come from this interpreter's site-packages, added as a
    # plain path: its .pth files (the editable install of this checkout) are not processed.
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vae_cli.conf; print(vae_cli.conf.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(venv_site))
    job = subprocess.run(
        [str(venv / "bin" / "vae-train"), "--cfg", "job"], cwd=elsewhere, capture_output=True, text=True
    )
    assert job.returncode == 0, job.stderr
    assert "name: jensen" in job.stdout and "n_samples: 128" in job.stdout and "K: 2" in job.stdout
    info = subprocess.run(
        [str(venv / "bin" / "vae-train"), "--info", "searchpath"], cwd=elsewhere, capture_output=True, text=True
    )
    assert "pkg://vae_cli.conf" in info.stdout
    assert list(elsewhere.iterdir()) == []  # --cfg writes nothing


@pytest.mark.slow
def test_help_introduces_the_tool_and_lists_every_key_once(tmp_path):
    """What the tool does first, the commands, the groups a user chooses (no schema groups), every key."""
    text = run_cli(["vae-train", "--help"], cwd=tmp_path).stdout
    assert text.startswith("vae-train: train a latent-variable model") and "powered by Hydra" not in text
    assert "schemas" not in text and "vae-eval RUN_DIR" in text and "vae-plot RUN_DIR" in text
    lines = [line.strip() for line in text.splitlines()]
    for key in keys.keys():  # every key of the schema, each once, with its default and its help
        (line,) = [line for line in lines if line.startswith(f"{key.path}=")]
        assert key.help.split(" (")[0] in line, key.path
    assert next(line for line in lines if line.startswith("data.n_train=")).count("synthetic:") == 1
    for group, options in keys.GROUPS.items():
        assert any(line.startswith(group) and all(o in line for o in options) for line in lines), group
    for prog in ("vae-eval", "vae-plot"):
        other = run_cli([prog, "--help"], cwd=tmp_path).stdout
        assert other.startswith(f"usage: {prog}") and "vae-train" in other


@pytest.mark.slow
def test_bash_completion_installs_and_completes_choices_and_keys(tmp_path):
    script = run_cli(["vae-train", "--shell-completion", "install=bash"], cwd=tmp_path)
    assert (
        script.returncode == 0 and "complete -o nospace -o default -F hydra_bash_completion vae-train" in script.stdout
    )
    query = run_cli(["vae-train", "-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": "vae-train objective="})
    assert query.stdout.split() == [
        "objective=elbo",
        "objective=exact",
        "objective=iwae",
        "objective=jensen",
        "objective=prior_iwae",
    ]
    keys = run_cli(["vae-train", "-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": "vae-train eval.imp"})
    assert "eval.importance_n_images=" in keys.stdout.split()
