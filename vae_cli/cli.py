"""Console entry points. They parse, call the library, and turn a user error into one line."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
from omegaconf import DictConfig

from vae_cli.config import register_configs
from vae_cli.errors import Abort, UserError

register_configs()


def one_line(exc: BaseException) -> str:
    """An exception and its cause as a single line (Hydra's and OmegaConf's messages span several)."""
    parts = [str(exc)]
    if exc.__cause__ is not None and str(exc.__cause__) not in parts[0]:
        parts.append(str(exc.__cause__))
    text = ": ".join(p for p in parts if p)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("object_type=", "full_key:", "reference_type="))]
    text = " ".join(lines)
    return text.split(" Config search path:")[0]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input: one line on stderr, exit code 2, no traceback. Bugs keep their traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except Abort as abort:
        print(f"vae-cli: error: {one_line(abort.error)}", file=sys.stderr)
        sys.exit(abort.error.exit_code)
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        print(f"vae-cli: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://vae_cli.conf", config_name="config")
def _train_app(cfg: DictConfig) -> float:
    from vae_cli.training import train

    try:
        return train(cfg)["final_loss"]
    except UserError as exc:
        raise Abort(exc) from None


def train_main() -> None:
    # Hydra re-raises instead of printing its own multi-line report; user_errors prints one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    with user_errors():
        _train_app()


def plot_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vae-plot", description="Redraw the figures of vae-train run directories.")
    parser.add_argument("paths", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=None, help="write figures here instead of into each run directory")
    args = parser.parse_args(argv)
    from vae_cli.replot import redraw_run

    done = 0
    for path in args.paths:
        try:
            out = redraw_run(path, args.out / path.name if args.out else path)
        except UserError as exc:
            print(f"vae-plot: skipped {path}: {one_line(exc)}", file=sys.stderr)
            continue
        print(f"vae-plot: {path} -> {out}")
        done += 1
    if done == 0:
        sys.exit(2)
