"""vae-plot: the figures of runs from their own files, and for several runs the comparison."""

from __future__ import annotations

import sys
from pathlib import Path

from vae_cli.commands.boundary import command_parser, exit_with, user_errors
from vae_cli.errors import RunDirError
from vae_cli.run.files import check_creatable
from vae_cli.run.rundir import find_runs


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(
        "vae-plot",
        "Redraw the figures of vae-train runs; for a multirun directory or several runs, "
        "also the comparison figures, comparison.csv/.md and a report.md.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or multirun directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write here instead of into the run (or multirun) directory; several paths default to ./vae-plot/DATE/TIME",
    )
    args = parser.parse_args(argv)
    with user_errors("vae-plot"):
        if args.out is not None:
            check_creatable(args.out, "output directory")
        if not any(_has_runs(p) for p in args.paths):  # nothing to draw: say so before torch is imported
            for path in args.paths:
                print(f"vae-plot: skipped {' '.join(_why(path).split())}", file=sys.stderr)
            exit_with("vae-plot", "error: ", "nothing could be plotted", 2)
        # The figures, torch and matplotlib, only now that there is something to draw.
        from vae_cli.stages.figures import plot

        result = plot(args.paths, args.out)
    for line in result.skipped:
        print(f"vae-plot: skipped {' '.join(line.split())}", file=sys.stderr)
    for run in result.runs:
        for note in run.notes:
            print(f"vae-plot: note: {run.path}: {' '.join(note.split())}", file=sys.stderr)
        print(f"vae-plot: {run.path} -> {run.out_dir} ({', '.join(f.path.name for f in run.figures)})")
    if result.figures:
        print(
            f"vae-plot: comparison of {len(result.runs)} runs -> {result.out_dir} "
            f"({', '.join(p.name for p in [*result.tables, *(f.path for f in result.figures)])})"
        )
    if result.report is not None:
        print(f"vae-plot: report -> {result.report}")
    if result.plotted == 0:
        exit_with("vae-plot", "error: ", "nothing could be plotted", 2)
    if result.requested_skipped:  # what was drawn stays; the exit code says that a path was not
        names = ", ".join(str(p) for p in result.requested_skipped)
        exit_with("vae-plot", "error: ", f"nothing drawn for {names} (see the skipped lines above)", 2)


def _has_runs(path: Path) -> bool:
    try:
        return bool(find_runs(path)[0])
    except RunDirError:
        return False


def _why(path: Path) -> str:
    try:
        find_runs(path)
    except RunDirError as exc:
        return str(exc)
    return f"{path}: no runs"
