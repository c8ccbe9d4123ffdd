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
    """Bad input: one line on stderr, exit code 2, no traceback. Bugs keep their traceback.
    A UserError says its own exit code (3 non-finite loss, 130/143 interrupted: vae_cli.errors)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except Abort as abort:
        print(f"vae-cli: {abort.error.prefix}{one_line(abort.error)}", file=sys.stderr)
        sys.exit(abort.error.exit_code)
    except UserError as exc:
        print(f"vae-cli: {exc.prefix}{one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"vae-cli: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and says how to resume)
        print("vae-cli: interrupted (SIGINT)", file=sys.stderr)
        sys.exit(130)


def check_command_line(argv: list[str]) -> None:
    """Refuse, as one UserError line, what Hydra would answer with a usage block or a traceback:
    an unknown flag, an override without a key (`=3`), and --experimental-rerun (it unpickles a file)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args_parser = get_args_parser()

    def error(message: str) -> None:
        raise UserError(f"{message} (see vae-train --help)")

    args_parser.error = error  # type: ignore[method-assign]
    args = args_parser.parse_args(argv)
    if args.experimental_rerun is not None:
        raise UserError("--experimental-rerun is not supported (it unpickles a file); continue a run with vae-train resume=RUN_DIR")
    parser = OverridesParser.create()
    for line in args.overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as exc:  # Hydra's message shows only the bad part: name the whole override
            raise UserError(f"malformed override {line!r}: {' '.join(str(exc).split())}") from None
        if not override.key_or_group.strip("/."):
            raise UserError(f"malformed override {line!r}: expected key=value")
        _check_group_choice(override)


def _check_group_choice(override) -> None:
    """A config group (objective=, data=, hydra/launcher=, ...) takes a config's name; Hydra
    answers anything else (data=0, ~data=1) with a ValueError and a traceback."""
    from importlib.resources import files

    key = override.key_or_group
    conf = files("vae_cli.conf")
    groups = {p.name: sorted(f.name[:-5] for f in p.iterdir() if f.name.endswith(".yaml")) for p in conf.iterdir() if p.is_dir()}
    if key not in groups and not key.startswith("hydra/") or override.is_sweep_override():
        return
    value = override.value()
    names = isinstance(value, list) and all(isinstance(v, str) for v in value) and not override.is_delete()
    if isinstance(value, str) or names or (value is None and override.is_delete()):
        return
    allowed = f"one of {', '.join(groups[key])}" if key in groups else "the name of one of its configs"
    raise UserError(f"invalid value {override.input_line!r}: the config group {key} takes {allowed}")


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
        check_command_line(sys.argv[1:])
        _train_app()


def plot_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vae-plot",
        description="Redraw the figures of vae-train runs; for a multirun directory or several runs, "
        "also the comparison figures, comparison.csv/.md and a report.md.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or multirun directories")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write here instead of into the run (or multirun) directory; several paths default to ./vae-plot/DATE/TIME",
    )
    args = parser.parse_args(argv)
    from vae_cli.replot import plot

    result = plot(args.paths, args.out)
    for line in result.skipped:
        print(f"vae-plot: skipped {' '.join(line.split())}", file=sys.stderr)
    for run in result.runs:
        for note in run.notes:
            print(f"vae-plot: note: {run.run.path}: {' '.join(note.split())}", file=sys.stderr)
        print(f"vae-plot: {run.run.path} -> {run.out_dir} ({', '.join(f.path.name for f in run.figures)})")
    if result.figures:
        print(f"vae-plot: comparison of {len(result.runs)} runs -> {result.out_dir} "
              f"({', '.join(p.name for p in [*result.tables, *(f.path for f in result.figures)])})")
    if result.report is not None:
        print(f"vae-plot: report -> {result.report}")
    if result.plotted == 0:
        print("vae-plot: error: nothing could be plotted", file=sys.stderr)
        sys.exit(2)


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vae-eval",
        description="Estimate the test-set log p(x) of vae-train runs (quadrature for K <= 2, importance sampling, "
        "prior Monte Carlo) next to the Jensen bound, the ELBO and IWAE-k; writes eval.json into each run directory "
        "and the headline numbers into its summary.json. Options not given keep the run's own eval.* settings.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--n-images", type=int, help="only the first N test images (default: all)")
    parser.add_argument("--importance-k", type=int, help="draws from q(z|x) per image (default: 5000 on CUDA, 1000 on the CPU)")
    parser.add_argument("--quadrature-points", type=int, help="grid points in all, for K <= 2 (default: 147456 = 384^2)")
    parser.add_argument("--prior-mc-samples", type=int, help="prior draws shared by every image (default: 10000)")
    parser.add_argument("--batch-size", type=int, help="images per pass (default: 1000); results do not depend on it")
    parser.add_argument("--data-root", help="read the test set from here instead of the run's data.root")
    args = parser.parse_args(argv)
    from vae_cli.evaluate import EVAL, eval_config, evaluate_run, format_table

    keys = ("n_images", "importance_k", "quadrature_points", "prior_mc_samples", "batch_size")
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    with user_errors():
        eval_config(None, overrides)  # a bad option fails once, before any run is loaded
    failed = 0
    for path in args.paths:
        try:
            result = evaluate_run(path, args.device, overrides, args.data_root)
        except UserError as exc:
            message = one_line(exc)
            print(f"vae-eval: error: {message if str(path) in message else f'{path}: {message}'}", file=sys.stderr)
            failed += 1
            continue
        print(f"vae-eval: {path} ({result['objective']}) -> {path / EVAL}")
        print(format_table(result))
    if failed:
        sys.exit(2)
