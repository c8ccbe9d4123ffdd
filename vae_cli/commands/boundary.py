"""The error boundary of the console scripts: bad input becomes one line on stderr and exit code 2
(a UserError's own code otherwise: 3 for a non-finite loss, 4 for a dead cluster job, 130/143 for an
interrupted run); HYDRA_FULL_ERROR=1 shows the full traceback. No torch here: the commands answer
--help and refuse bad input before torch is imported."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

import vae_cli
from vae_cli.errors import Abort, JobFailed, UserError
from vae_cli.run import keys
from vae_cli.run.keys import DEVICES

# What the allocators say when a size does not fit (torch.OutOfMemoryError is CUDA's).
OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")
# submitit's errors for a sweep's job that died on a cluster (FailedJobError is an UncompletedJobError),
# told by name: submitit is imported only by the launcher that runs such jobs
CLUSTER_JOB_ERRORS = ("UncompletedJobError",)


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


def exit_with(prog: str, prefix: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {prefix}{message}", file=sys.stderr)
    sys.exit(code)


def full_traceback() -> bool:
    """The user asked for Python's traceback (HYDRA_FULL_ERROR=1, as for any Hydra app)."""
    return os.environ.get("VAE_CLI_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


@contextmanager
def user_errors(prog: str = "vae-cli") -> Iterator[None]:
    """Bad input: one line on stderr, exit code 2, no traceback; bugs keep their traceback.

    The user's HYDRA_FULL_ERROR=1 (read when the command started: vae-train sets it for Hydra
    itself, see vae_cli.commands.train.main) asks for the full traceback of everything."""
    full = full_traceback()
    try:
        yield
    except Abort as abort:
        if full:
            raise abort.error from None
        exit_with(prog, abort.error.prefix, one_line(abort.error), abort.error.exit_code)
    except UserError as exc:
        if full:
            raise
        exit_with(prog, exc.prefix, one_line(exc), exc.exit_code)
    except (HydraException, OmegaConfBaseException) as exc:
        if full:
            raise
        exit_with(prog, "error: ", one_line(exc), 2)
    except (MemoryError, RuntimeError) as exc:  # a size that passed the estimate, or a dead cluster job
        if not full and any(c.__name__ in CLUSTER_JOB_ERRORS for c in type(exc).__mro__):
            error = cluster_job_error(exc)
            exit_with(prog, error.prefix, str(error), error.exit_code)
        out_of_memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
        if full or not (out_of_memory or any(text in str(exc) for text in OUT_OF_MEMORY)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        exit_with(
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
        exit_with(prog, "error: ", f"{where}{exc.strerror or exc}", 2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and says how to resume)
        exit_with(prog, "", "interrupted (SIGINT)", 130)


COMMANDS = """the commands:
  vae-train objective=jensen K=2        one run (vae-train --help lists every key)
  vae-train -m objective=jensen,prior_iwae,elbo n_samples=1,8,128   a sweep
  vae-eval RUN_DIR|MULTIRUN_DIR [--full]  test-set log p(x) by every estimator, the bounds and their gaps
  vae-plot RUN_DIR|MULTIRUN_DIR ...     the figures, comparison.csv/.md and report.md
  vae-check [--quick] [--device cuda]   certify this installation on its device (check.json)

Bad input gets one line and exit code 2; HYDRA_FULL_ERROR=1 shows the traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers a bad option with one line and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        exit_with(self.prog, "error: ", f"{message} (see {self.prog} --help)", 2)


def command_parser(prog: str, description: str, device: bool = False) -> OneLineParser:
    """The parser of an argparse command: its description, --version, the commands' list below the
    options, and where asked --device with the `device` key's choices, default and help."""
    p = OneLineParser(
        prog=prog, epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter, description=description
    )
    p.add_argument("--version", action="version", version=f"{prog} (vae-cli) {vae_cli.__version__}")
    if device:
        key = next(k for k in keys.keys() if k.path == "device")
        p.add_argument("--device", choices=DEVICES, default=key.default, help=f"{key.help} (default {key.default})")
    return p
