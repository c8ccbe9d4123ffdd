"""Console entry points: vae-train, vae-eval, vae-plot. They parse, call the library, and turn
bad input into one line on stderr and exit code 2 (a UserError's own code otherwise: 3 for a
non-finite loss, 130/143 for an interrupted run). HYDRA_FULL_ERROR=1 shows the full traceback."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import NoReturn

import hydra
import torch

# get_args_parser is Hydra's own command-line parser; Hydra has no public API that parses a
# command line without running the app.
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vae_cli import callbacks, pipeline
from vae_cli.config import (
    AIS_N_IMAGES,
    BDMC_N_IMAGES,
    IMPORTANCE_K,
    IMPORTANCE_N_IMAGES,
    EvalConfig,
    device_defaults,
    register_configs,
)
from vae_cli.device import flush_denormals
from vae_cli.errors import Abort, JobFailed, UserError
from vae_cli.evaluation import eval_config, evaluate_run, format_table
from vae_cli.figures import plot
from vae_cli.rundir import EVAL

try:  # vae-cli[launchers]: a sweep on a cluster (hydra/launcher=submitit_*) reports a dead job with it
    from submitit.core.utils import UncompletedJobError  # FailedJobError is one too

    CLUSTER_JOB_ERRORS: tuple[type[Exception], ...] = (UncompletedJobError,)
except ImportError:  # without submitit no job runs on a cluster
    CLUSTER_JOB_ERRORS = ()

register_configs()

# What the allocators say when a size does not fit (torch.OutOfMemoryError is CUDA's).
OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")


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


# What submitit says of a job that ended without a result: "Job 7_1 (task: 0) with path
# .../.submitit/7_1/7_1_0_result.pkl has not produced any output (state: FAILED)", then the job's
# stderr, whose last "module.Error: message" line is why; or, for a job whose function raised,
# "Job (task=0) failed during processing with trace: ..." and the paths of its logs.
JOB_ID = re.compile(r"Job (\S+) \(task")
JOB_STATE = re.compile(r"\(state: ([^)]*)\)")
JOB_FILE = re.compile(r"(\S+/\.submitit/(\S+?)/\S+?)_(?:result\.pkl|log\.err|log\.out)")
ERROR_LINE = re.compile(r"^([\w.]*?)(\w+): (.+)$")  # vae_cli.errors.Abort: non-finite loss ...
SLURM_LINE = ("srun:", "slurmstepd:", "submitit ")


def cluster_job_error(exc: BaseException) -> JobFailed:
    """One line for a sweep job that died on the cluster: its id, its state, why, and its log."""
    text = str(exc)
    path, job_id, state = JOB_FILE.search(text), JOB_ID.search(text), JOB_STATE.search(text)
    name = job_id.group(1) if job_id else path.group(2) if path else "?"
    lines = [line.strip() for line in text.splitlines()]
    matches = [m for line in lines if not line.startswith(SLURM_LINE) and (m := ERROR_LINE.match(line))]
    # our own errors say what happened; anyone else's keep their type (ValueError: ...)
    reasons = [m.group(3) if m.group(1).startswith("vae_cli.") else f"{m.group(2)}: {m.group(3)}" for m in matches]
    what = "was cancelled" if state and state.group(1).startswith("CANCELLED") else "failed"
    message = f"cluster job {name} {what}" + (f" (state {state.group(1)})" if state else "")
    if reasons:
        message += f": {reasons[-1]}"
    if path:
        message += f"; its log: {path.group(1)}_log.err"
    return JobFailed(message + " (other jobs of the sweep, if any, keep running: squeue)")


def _exit(prog: str, prefix: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {prefix}{message}", file=sys.stderr)
    sys.exit(code)


def full_traceback() -> bool:
    """The user asked for Python's traceback (HYDRA_FULL_ERROR=1, as for any Hydra app)."""
    return os.environ.get("VAE_CLI_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


@contextmanager
def user_errors(prog: str = "vae-cli") -> Iterator[None]:
    """Bad input: one line on stderr, exit code 2, no traceback; bugs keep their traceback.

    The user's HYDRA_FULL_ERROR=1 (read when the command started: vae-train sets it for Hydra
    itself, see train_main) asks for the full traceback of everything."""
    full = full_traceback()
    try:
        yield
    except Abort as abort:
        if full:
            raise abort.error from None
        _exit(prog, abort.error.prefix, one_line(abort.error), abort.error.exit_code)
    except UserError as exc:
        if full:
            raise
        _exit(prog, exc.prefix, one_line(exc), exc.exit_code)
    except (HydraException, OmegaConfBaseException) as exc:
        if full:
            raise
        _exit(prog, "error: ", one_line(exc), 2)
    except CLUSTER_JOB_ERRORS as exc:  # before RuntimeError, which it is
        if full:
            raise
        error = cluster_job_error(exc)
        _exit(prog, error.prefix, str(error), error.exit_code)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:  # a size that passed the estimate
        if (
            full
            or not isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            and not any(text in str(exc) for text in OUT_OF_MEMORY)
        ):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _exit(
            prog,
            "error: ",
            f"out of memory ({first[:160]}); allowed: smaller n_samples, batch_size, "
            "micro_batch, model.hidden or eval.* sizes",
            2,
        )
    except OSError as exc:  # the file system: a path that cannot be created, a full disk
        if full:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _exit(prog, "error: ", f"{where}{exc.strerror or exc}", 2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and says how to resume)
        _exit(prog, "", "interrupted (SIGINT)", 130)


COMMANDS = """the three commands:
  vae-train objective=jensen K=2        one run (vae-train --help lists every key)
  vae-train -m objective=jensen,prior_iwae,elbo n_samples=1,8,128   a sweep
  vae-eval RUN_DIR [--full]             test-set log p(x) by every estimator, the bounds and their gaps
  vae-plot RUN_DIR|MULTIRUN_DIR ...     the figures, comparison.csv/.md and report.md

Bad input gets one line and exit code 2; HYDRA_FULL_ERROR=1 shows the traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers a bad option with one line and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        _exit(self.prog, "error: ", f"{message} (see {self.prog} --help)", 2)


def check_command_line(argv: list[str]) -> None:
    """Refuse, as one UserError line, what Hydra would answer with a usage block or a traceback:
    an unknown flag, an override without a key (`=3`), and --experimental-rerun (it unpickles a file)."""
    args_parser = get_args_parser()

    def error(message: str) -> None:
        raise UserError(f"{message} (see vae-train --help)")

    args_parser.error = error  # type: ignore[method-assign]
    args = args_parser.parse_args(argv)
    if args.experimental_rerun is not None:
        raise UserError(
            "--experimental-rerun is not supported (it unpickles a file); continue a run with vae-train resume=RUN_DIR"
        )
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
    key = override.key_or_group
    conf = files("vae_cli.conf")
    groups = {
        p.name: sorted(f.name[:-5] for f in p.iterdir() if f.name.endswith(".yaml"))
        for p in conf.iterdir()
        if p.is_dir()
    }
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
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        changed = callbacks.changed_keys(callbacks.task_overrides(hydra_cfg))
        return pipeline.train(cfg, run_dir, changed, callbacks.take_prepared(run_dir))["final_loss"]
    except UserError as exc:
        raise Abort(exc) from None


def train_main() -> None:
    flush_denormals()  # before torch starts its threads, which keep the flag they start with
    # Hydra re-raises instead of printing its own multi-line report; user_errors prints one line,
    # or the whole traceback where the user set HYDRA_FULL_ERROR=1 (kept as VAE_CLI_FULL_ERROR).
    os.environ.setdefault("VAE_CLI_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with user_errors():
        check_command_line(sys.argv[1:])
        _train_app()


def plot_main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        prog="vae-plot",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Redraw the figures of vae-train runs; for a multirun directory or several runs, "
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
        result = plot(args.paths, args.out)
    for line in result.skipped:
        print(f"vae-plot: skipped {' '.join(line.split())}", file=sys.stderr)
    for run in result.runs:
        for note in run.notes:
            print(f"vae-plot: note: {run.run.path}: {' '.join(note.split())}", file=sys.stderr)
        print(f"vae-plot: {run.run.path} -> {run.out_dir} ({', '.join(f.path.name for f in run.figures)})")
    if result.figures:
        print(
            f"vae-plot: comparison of {len(result.runs)} runs -> {result.out_dir} "
            f"({', '.join(p.name for p in [*result.tables, *(f.path for f in result.figures)])})"
        )
    if result.report is not None:
        print(f"vae-plot: report -> {result.report}")
    if result.plotted == 0:
        _exit("vae-plot", "error: ", "nothing could be plotted", 2)
    if result.requested_skipped:  # what was drawn stays; the exit code says that a path was not
        names = ", ".join(str(p) for p in result.requested_skipped)
        _exit("vae-plot", "error: ", f"nothing drawn for {names} (see the skipped lines above)", 2)


def eval_main(argv: list[str] | None = None) -> None:
    flush_denormals()
    parser = OneLineParser(
        prog="vae-eval",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Estimate the test-set log p(x) of vae-train runs (quadrature for K <= 2, importance sampling, "
        "prior Monte Carlo) next to the Jensen bound, the ELBO and IWAE-k; writes eval.json into each run directory "
        "and the headline numbers into its summary.json. Options not given keep the run's own eval.* settings.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--n-images", type=int, help="only the first N test images (default: all)")
    parser.add_argument(
        "--importance-k", type=int, help=f"draws from q(z|x) per image (default: {device_defaults(IMPORTANCE_K)})"
    )
    parser.add_argument(
        "--importance-n-images",
        type=int,
        help="images for importance sampling, the ELBO and IWAE-k: the first N of those evaluated "
        f"(default: {device_defaults(IMPORTANCE_N_IMAGES)}; 0 = all)",
    )
    parser.add_argument(
        "--full", action="store_true", help="every estimator on every test image (--n-images 0 and the subsets off)"
    )
    parser.add_argument(
        "--quadrature-points", type=int, help="grid points in all, for K <= 2 (default: 147456 = 384^2)"
    )
    parser.add_argument("--prior-mc-samples", type=int, help="prior draws shared by every image (default: 10000)")
    parser.add_argument(
        "--ais",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="annealed importance sampling at every K (log_px where K > 2; next to the quadrature where K <= 2)",
    )
    parser.add_argument(
        "--ais-steps", type=int, help=f"AIS intermediate distributions (default: {EvalConfig.ais_steps})"
    )
    parser.add_argument("--ais-chains", type=int, help=f"AIS chains per image (default: {EvalConfig.ais_chains})")
    parser.add_argument(
        "--ais-n-images", type=int, help=f"AIS images (default: {device_defaults(AIS_N_IMAGES)}; 0 = all)"
    )
    parser.add_argument(
        "--ais-bf16-gradients",
        action=argparse.BooleanOptionalAction,
        help="the leapfrog's gradient from a bf16 copy of the decoder; energies and weights stay float32 "
        "(default: where the device multiplies bf16 natively)",
    )
    parser.add_argument(
        "--bdmc-n-images",
        type=int,
        help=f"images simulated from the model for BDMC (default: {device_defaults(BDMC_N_IMAGES)})",
    )
    parser.add_argument("--batch-size", type=int, help="images per pass (default: 1000); results do not depend on it")
    parser.add_argument("--data-root", help="read the test set from here instead of the run's data.root")
    args = parser.parse_args(argv)
    keys = (
        "n_images",
        "importance_k",
        "importance_n_images",
        "quadrature_points",
        "prior_mc_samples",
        "batch_size",
        "ais",
        "ais_steps",
        "ais_chains",
        "ais_n_images",
        "ais_bf16_gradients",
        "bdmc_n_images",
    )
    overrides = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.full:  # every image for every estimator, whatever the run's own eval.* said
        overrides.update(n_images=None, importance_n_images=0, ais_n_images=0)
    with user_errors("vae-eval"):
        eval_config(None, overrides)  # a bad option fails once, before any run is loaded
    failed = 0
    with user_errors("vae-eval"):
        for path in args.paths:
            try:
                result = evaluate_run(path, args.device, overrides, args.data_root)
            except UserError as exc:  # one line naming the run; the other runs are still evaluated
                if full_traceback():
                    raise
                message = one_line(exc)
                print(f"vae-eval: error: {message if str(path) in message else f'{path}: {message}'}", file=sys.stderr)
                failed += 1
                continue
            print(f"vae-eval: {path} ({result['objective']}) -> {path / EVAL}")
            print(format_table(result))
    if failed:
        sys.exit(2)
