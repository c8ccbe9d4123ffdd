"""vae-eval: test-set log p(x) of trained runs, from their own files. Its options that set eval.*
keys are made from the schema (vae_cli.run.keys.EvalConfig): the same names, types, defaults and help."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from vae_cli.commands.boundary import OneLineParser, command_parser, full_traceback, one_line, user_errors
from vae_cli.errors import RunDirError, UserError
from vae_cli.run import keys
from vae_cli.run.config import eval_config
from vae_cli.run.keys import EVERY_IMAGE, shown_default
from vae_cli.run.rundir import EVAL, EVAL_IMAGES, SUMMARY, find_runs

NOT_FLAGS = ("enabled",)  # eval.* keys that mean nothing to vae-eval


def eval_keys() -> list[keys.Key]:
    return [k for k in keys.keys() if k.path.startswith("eval.") and k.path.split(".")[1] not in NOT_FLAGS]


def parser() -> OneLineParser:
    p = command_parser(
        "vae-eval",
        "Estimate the test-set log p(x) of vae-train runs (the closed form for linear-Gaussian models, "
        "quadrature for K <= 2, annealed importance sampling, importance sampling, prior Monte Carlo) next to the "
        f"Jensen bound, the ELBO and IWAE-k; writes {EVAL} and {EVAL_IMAGES} into each run directory and the "
        f"headline numbers into its {SUMMARY}. A multirun directory: each of its runs. Options not given keep the "
        f"run's own eval.* settings; estimates {EVAL} holds for the same checkpoint and settings are reused.",
        device=True,
    )
    p.add_argument("paths", nargs="+", type=Path, help="run directories, or multirun directories of them")
    for k in eval_keys():
        name = k.path.split(".")[1]
        flag = "--" + name.replace("_", "-")
        text = f"eval.{name}: {k.help} (the run's own setting; default {shown_default(k.default)})"
        if k.type_name == "bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=name, type=float if k.type_name == "float" else int, default=None, help=text)
    p.add_argument(
        "--full", action="store_true", help="every estimator on every test image (--n-images and the subsets off)"
    )
    p.add_argument("--recompute", action="store_true", help=f"run every estimator again, even those {EVAL} holds")
    p.add_argument("--data-root", help="read the test set from here instead of the run's data.root")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    overrides = {k.path[5:]: getattr(args, k.path[5:]) for k in eval_keys() if getattr(args, k.path[5:]) is not None}
    if args.full:  # every image for every estimator, whatever the run's own eval.* said
        overrides.update(EVERY_IMAGE)
    with user_errors("vae-eval"):
        eval_config(None, overrides)  # a bad option fails once, before any run is loaded
    runs, failed = [], 0
    for path in args.paths:
        try:
            runs += find_runs(path)[0]
        except RunDirError as exc:
            print(f"vae-eval: error: {one_line(exc)}", file=sys.stderr)
            failed += 1
    if runs:
        # The evaluation and torch, only now that the options and paths have been checked.
        from vae_cli.stages.evaluation import evaluate_run, format_table

        with user_errors("vae-eval"):
            for path in runs:
                try:
                    said = functools.partial(print, f"vae-eval: {path}:", file=sys.stderr, flush=True)
                    result = evaluate_run(path, args.device, overrides, args.data_root, args.recompute, said)
                except UserError as exc:  # one line naming the run; the other runs are still evaluated
                    if full_traceback():
                        raise
                    message = one_line(exc)
                    print(
                        f"vae-eval: error: {message if str(path) in message else f'{path}: {message}'}", file=sys.stderr
                    )
                    failed += 1
                    continue
                print(f"vae-eval: {path} ({result['objective']}) -> {path / EVAL}")
                print(format_table(result))
    if failed:
        sys.exit(2)
