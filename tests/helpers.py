"""Helpers the tests share: tiny settings, configs composed in-process with Hydra's compose API,
the console scripts run in a subprocess or in-process."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import vae_cli.pipeline
from vae_cli.cli import train_main
from vae_cli.config import register_configs
from vae_cli.rundir import CHECKPOINT, LOSSES, SUMMARY, load_checkpoint

register_configs()

# Tiny settings: synthetic data, a small decoder, a few steps. Fast on 2 CPU cores.
TINY = [
    "data=synthetic",
    "data.n_train=256",
    "data.n_test=64",
    "K=2",
    "model.hidden=16",
    "model.depth=2",
    "n_samples=4",
    "batch_size=16",
    "n_train_iters=5",
    "progress=false",
    "device=cpu",
    "eval.enabled=false",  # the end-of-training evaluation is tested on its own in test_eval.py
]
BIN = Path(sys.executable).parent


def compose_config(overrides: list[str] | None = None, tiny: bool = True):
    """The config `vae-train <overrides>` would run, composed in-process (TINY first, where asked;
    its synthetic sizes only while the data set stays synthetic)."""
    overrides = list(overrides or [])
    base = TINY if tiny else []
    if any(o.startswith("data=") and o != "data=synthetic" for o in overrides):
        base = [o for o in base if not o.startswith(("data.n_train", "data.n_test"))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vae_cli.conf", version_base="1.3"):
            return compose(config_name="config", overrides=base + overrides)
    finally:
        GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (vae-train, vae-plot, ...) in a subprocess."""
    exe = shutil.which(args[0], path=str(BIN)) or args[0]
    inherited = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


class Reached(BaseException):
    """Raised instead of loading data: the command line was accepted."""


def _reached(*args, **kwargs):
    raise Reached


def vae_train(args: list[str], env: dict[str, str] | None = None) -> tuple[int | None, str, list[str]]:
    """Run `vae-train ARGS` in-process in an empty directory: (exit code, stderr, files created).

    Data loading raises Reached (the command line was accepted). Warnings are errors here: Hydra
    reports an exception in a callback as a warning."""
    cwd = os.getcwd()
    saved_env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        err = io.StringIO()
        saved_argv, saved_load = sys.argv, vae_cli.pipeline.load_data
        sys.argv = ["vae-train", *args]
        vae_cli.pipeline.load_data = _reached
        for key in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR"):
            os.environ.pop(key, None)
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("error")
                train_main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv, vae_cli.pipeline.load_data = saved_argv, saved_load
            os.environ.clear()
            os.environ.update(saved_env)
            GlobalHydra.instance().clear()
            os.chdir(cwd)
            created = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
    return code, err.getvalue(), created


RUN_FILES = ("losses.csv", "summary.json", "checkpoint.pt", "loss.png", "samples.png", "means.png", "train.log")


def read_table(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_jobs(sweep, n_jobs: int) -> list[dict[str, str]]:
    for i in range(n_jobs):
        for name in RUN_FILES:
            assert (sweep / str(i) / name).stat().st_size > 0, f"job {i}: {name}"
    table = read_table(sweep / "comparison.csv")
    assert [row["run"] for row in table] == [str(i) for i in range(n_jobs)]
    assert all(row["status"] == "completed" and float(row["final_loss"]) > 0 for row in table)
    return table


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final parameters and optimizer state equal (torch.equal), losses.csv equal byte for byte."""
    got, want = load_checkpoint(run_dir / CHECKPOINT), load_checkpoint(reference / CHECKPOINT)
    assert got["step"] == want["step"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for i, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][i][key], value), (i, key)
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])
    assert (run_dir / LOSSES).read_bytes() == (reference / LOSSES).read_bytes()
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "completed"
