"""The documentation's key table (docs/configuration.md), made from the schema: `make keys-table`
writes it between its markers, and a test fails when the page's copy differs from what the schema says.

    python -m vae_cli.commands.readme docs/configuration.md           # rewrite the table in place
    python -m vae_cli.commands.readme --check docs/configuration.md   # exit 1 when it differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae_cli.commands.app import readme_table

BEGIN = "<!-- keys: made by `make keys-table` from vae_cli/run/keys.py; edit the schema, not this table -->"
END = "<!-- end of keys -->"


def with_table(text: str) -> str:
    """The page's text with its key table replaced by the schema's."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no key table between {BEGIN!r} and {END!r}")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{readme_table()}{END}{after}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path, help="the page holding the table (docs/configuration.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page's table differs")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = with_table(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the key table differs from the schema; run `make keys-table`", file=sys.stderr)
            sys.exit(1)
        return
    args.readme.write_text(new)


if __name__ == "__main__":
    main()
