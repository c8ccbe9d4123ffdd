"""docs/api.md runs as written: every ```python block, in order, in one namespace, on a tiny run
made here (RUN_DIR, which the page asks the reader to set), in a scratch working directory."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import TINY

import vae_cli

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_every_python_block_of_the_api_page_runs(tmp_path, monkeypatch):
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 4 and any("imshow" in b and "reshape(28, 28)" in b for b in blocks)
    run_dir = tmp_path / "elbo"
    vae_cli.train([*TINY, "objective=elbo"], run_dir)
    monkeypatch.chdir(tmp_path)
    namespace = {"RUN_DIR": str(run_dir), "__name__": "__docs__"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{PAGE.name} block {number}", "exec"), namespace)
    assert (tmp_path / "decoded.png").stat().st_size > 0  # the plotting snippet drew its figure
    assert namespace["log_px"].shape == (16,) and not namespace["log_px"].requires_grad
    assert namespace["z"].grad is not None  # the module's outputs carry gradients
