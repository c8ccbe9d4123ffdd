"""Exit 1 with one line when this interpreter is outside pyproject.toml's requires-python.

Run by `make setup` with the interpreter it would build .venv from, before anything is installed, so
it reads pyproject.toml without tomllib and compares plain X.Y bounds (>=, >, <, <=, ==, !=), and
runs on any Python from 3.6.
"""

import re
import sys
from pathlib import Path

COMPARE = {
    ">=": lambda v, b: v >= b,
    ">": lambda v, b: v > b,
    "<": lambda v, b: v < b,
    "<=": lambda v, b: v <= b,
    "==": lambda v, b: v == b,
    "!=": lambda v, b: v != b,
}


def main():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    spec = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M).group(1)
    version = sys.version_info[:2]
    for clause in spec.split(","):
        op, major, minor = re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*(\d+)\.(\d+)\s*", clause).groups()
        if not COMPARE[op](version, (int(major), int(minor))):
            print(
                f"make setup: Python {version[0]}.{version[1]} ({sys.executable}) is outside vae-cli's supported "
                f"range {spec} (pyproject.toml); name one inside it: make setup PYTHON=python3.X",
                file=sys.stderr,
            )
            sys.exit(1)


if __name__ == "__main__":
    main()
