"""One way to call the commands: every hint vae-cli prints, and every docs page, names them by their
plain names (vae-train, vae-eval, vae-plot), which docs/commands.md puts on PATH once (activate the
venv, or the make targets)."""

from __future__ import annotations

import re
from pathlib import Path

from vae_cli.run.preflight import resume_command

ROOT = Path(__file__).resolve().parents[1]
OTHER_FORMS = re.compile(
    r"\.venv/bin/vae-|bin/vae-(train|eval|plot)|python -m vae_cli\.commands\.(train|evaluate|plot)\b"
)


def test_the_code_and_the_docs_name_the_commands_one_way():
    files = [*(ROOT / "vae_cli").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml"), *(ROOT / "docs").glob("*.md")]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in OTHER_FORMS.finditer(f.read_text())]
    assert found == []
    assert resume_command(Path("run")).startswith("vae-train resume=")


def test_the_docs_say_once_how_to_put_the_commands_on_path():
    page = (ROOT / "docs" / "commands.md").read_text()
    assert ". .venv/bin/activate" in page and "make train" in page
