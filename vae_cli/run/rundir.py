"""The run directory: every file name, the writers (atomic: temp file, fsync, rename), the one
reader of a run's files (strict for resume and vae-eval, tolerant for vae-plot), the summary, the
states a run passes through, and the lock that lets one process at a time write into a run.

A run directory holds:
    .hydra/             Hydra's composed config and overrides (written by Hydra)
    .lock               held by the process writing into the run (vae-train, resume=, vae-eval)
    losses.csv          step,loss,<objective terms>; appended a whole line per step
    checkpoint.pt       {model, optimizer, step, rng, config, format} (vae_cli.run.checkpoint)
    summary.json        status and headline numbers
    loss.png, samples.png, means.png (and for K=2 manifold.png, posterior.png, encoded.png)
    eval.json           test-set log p(x) by every estimator, the bounds and their gaps
    eval_images.csv     every test image's log p(x) by each estimator, and its bounds

A run's status (summary.json) says which stages of `vae-train` remain, so `vae-train resume=DIR`
finishes a run killed at any point: see STATUSES. No torch here: the commands read run
directories before torch is imported.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae_cli.errors import PathError, RunDirError
from vae_cli.maths.spec import Z_LIMIT
from vae_cli.run.config import experiment_values
from vae_cli.run.files import atomic_write_bytes, read_json, write_json
from vae_cli.run.keys import GROUPS

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.csv"
SUMMARY = "summary.json"
EVAL = "eval.json"
EVAL_IMAGES = "eval_images.csv"
EVAL_IMAGES_DIGEST = "eval_images_sha256"  # the eval.json key that names the eval_images.csv written with it
LOCK = ".lock"
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = f"{HYDRA_DIR}/config.yaml"
HYDRA_OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"
MULTIRUN_YAML = "multirun.yaml"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
REPORT = "report.md"
RUN_FILES = (LOSSES, CHECKPOINT, SUMMARY)  # any of these makes a directory a run directory
LOSS_PNG, SAMPLES_PNG, MEANS_PNG = "loss.png", "samples.png", "means.png"
MANIFOLD_PNG, POSTERIOR_PNG, ENCODED_PNG = "manifold.png", "posterior.png", "encoded.png"
GRADIENT_SNR_PNG = "gradient_snr.png"  # drawn by the evaluation (eval.gradient_snr), redrawn by vae-plot
# One run's figures, their sizes (the drawing and the logger's grids use these), and what each shows
# (vae-plot's report quotes these lines).
SAMPLE_GRID = 8  # samples and means: 8x8 prior draws, the same z at every checkpoint
MANIFOLD_GRID = 15  # decoder means on a 15x15 grid of z
POSTERIOR_DIGITS = 5  # test digits shown next to the prior
_SQUARE = f"[-{Z_LIMIT:g}, {Z_LIMIT:g}]^2"
FIGURES = {
    LOSS_PNG: "the training loss with the bounds of the same samples on one axis, each other term on its own "
    "(every step, and a moving average)",
    SAMPLES_PNG: f"{SAMPLE_GRID}x{SAMPLE_GRID} samples x ~ p(x|z) for fixed prior draws z ~ p(z)",
    MEANS_PNG: f"{SAMPLE_GRID}x{SAMPLE_GRID} decoder means E[x|z] for the same z: means, not samples",
    MANIFOLD_PNG: f"decoder means over a {MANIFOLD_GRID}x{MANIFOLD_GRID} grid of z in {_SQUARE}: what each region "
    "of the latent space draws",
    POSTERIOR_PNG: f"the exact posterior p(z|x) of {POSTERIOR_DIGITS} test digits on a grid over {_SQUARE} next to "
    "the prior p(z), "
    "with each digit's log p(x) and KL(p(z) || p(z|x)), and zoomed in around each posterior (q(z|x) as ellipses "
    "for encoder models)",
    ENCODED_PNG: "the test set encoded: means of q(z|x), coloured by digit",
    GRADIENT_SNR_PNG: "the gradients' signal-to-noise against the sample count (log-log), encoder and decoder, "
    "each gradient estimator, the theory's slopes of -1/2 and +1/2 as guides (eval.json's gradient_snr)",
}
# The comparison of several runs (a multirun directory, or vae-plot --out)
LOSS_CURVES_PNG, METRICS_BY_RUN_PNG = "loss_curves.png", "metrics_by_run.png"


def metric_figure_name(key: str) -> str:
    """vs_<key>.png: the metrics against a swept parameter."""
    return "vs_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in key) + ".png"


FINAL_WINDOW = 50  # final_loss is the mean of the last this-many step losses, with its stderr

# The stages of `vae-train`, and what a resume still has to do in each status. A run without
# summary.json is `running` (or was killed while training). "evaluate" is skipped where
# eval.enabled is false; `completed` means every stage the config asks for is done.
STAGES = ("train", "figures", "evaluate")
STATUSES = {
    "running": STAGES,
    "interrupted": STAGES,  # SIGINT or SIGTERM between steps
    "preempted": STAGES,  # submitit's preemption or timeout signal; requeued
    "failed": STAGES,  # a non-finite loss or gradient; the last good checkpoint is kept
    "trained": ("figures", "evaluate"),
    "drawn": ("evaluate",),
    "completed": (),
}
TRAINED = ("trained", "drawn", "completed")  # the statuses of a run whose training has finished
# eval.json keys copied into summary.json, and their names there.
HEADLINE = {
    "log_px": "log_px",
    "log_px_stderr": "log_px_stderr",
    "estimator": "log_px_estimator",
    "gap_jensen": "gap_jensen",
    "gap_jensen_stderr": "gap_jensen_stderr",
    "gap_elbo": "gap_elbo",
    "gap_elbo_stderr": "gap_elbo_stderr",
    "gap_approximation": "gap_approximation",
    "gap_approximation_stderr": "gap_approximation_stderr",
    "gap_amortization": "gap_amortization",
    "gap_amortization_stderr": "gap_amortization_stderr",
    "bits_per_dim": "bits_per_dim",
    "bdmc_gap": "bdmc_gap",
    "active_units": "active_units",
    "n_images": "eval_n_images",
}


# --- one writer per run directory ------------------------------------------------------------------


class RunLock:
    """An exclusive lock on RUN_DIR/.lock (flock), held by the one process that writes into the run:
    the kernel releases it when that process ends, however it ends (kill -9 too), so no lock is ever
    left stale. The file says who holds it (pid, host, since when, the command). Only a refused run
    takes back a lock file it made (forget); a lock counts only on the file that still has the name,
    so a process that locked a file just unlinked tries again and never holds a second lock.

    Where the file system cannot lock (ENOLCK, EOPNOTSUPP: some network file systems), the run goes
    on with a warning and `held` is False: nothing then stops a second writer."""

    def __init__(self, run_dir: Path, fd: int | None, reason: str = "", created: bool = False):
        self.run_dir, self._fd, self.reason = Path(run_dir), fd, reason
        self.created = created  # the lock file is this process's: a refused run takes it back (see forget)

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, run_dir: Path, command: str) -> RunLock:
        """The lock of run_dir (made if missing); RunDirError naming the holder when another process has it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd, created = _open_lock_file(path)
                try:
                    if _lock(fd, path):
                        break
                except _NoLocks as exc:  # the file system has no locks
                    os.close(fd)
                    if created:
                        path.unlink(missing_ok=True)
                    reason = f"{path}: {exc}"
                    log.warning("cannot lock %s: nothing stops a second writer of this run", reason)
                    return cls(run_dir, None, reason)
                os.close(fd)  # the file was unlinked before this process locked it: lock the new one
        except OSError as exc:
            raise PathError(f"cannot write run directory {run_dir}: {exc.strerror or type(exc).__name__}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({**info, "command": command}) + "\n").encode(), 0)
        except OSError as exc:  # a full disk: the lock is held all the same, its file just does not say by whom
            log.warning("%s: the holder could not be recorded (%s)", path, exc.strerror or type(exc).__name__)
        return cls(run_dir, fd, created=created)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def forget(self) -> None:
        """Release the lock of a refused run, taking back the lock file where this process made it
        (another process that opened it meanwhile finds it unlinked once it has the lock, and tries again)."""
        if self._fd is not None and self.created:
            (self.run_dir / LOCK).unlink(missing_ok=True)
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """(descriptor, whether this process made the file)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    try:
        return os.open(path, os.O_RDWR), False
    except FileNotFoundError:  # unlinked between the two opens
        return _open_lock_file(path)


class _NoLocks(Exception):
    """The file system answers flock with "not supported"."""


def _lock(fd: int, path: Path) -> bool:
    """Whether fd holds the lock of `path` (False: the file locked is no longer `path`, unlinked by a
    refused run: try again); RunDirError where another process holds it, _NoLocks where none can."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(
            f"{path.parent} is in use by {holder}: one process writes into a run at a time "
            "(wait for it to end, or stop it; a killed process frees the run at once)"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise _NoLocks(exc.strerror) from None
        os.close(fd)
        raise
    try:
        named, here = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    except OSError:
        os.close(fd)  # closing it frees the lock too
        raise
    return (named.st_dev, named.st_ino) == (here.st_dev, here.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: "pid 812 on host vm since 2026-12-01 12:00:03 (vae-train)"."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


# --- losses.csv -----------------------------------------------------------------------------------


class LossLog:
    """Appends one CSV row per training step and flushes it, so the file is always usable; keeps the
    columns in memory too (the figures draw from them, not from the file)."""

    def __init__(self, path: Path, columns: list[str], rows: bytes | None = None):
        """rows: the file's checked content to start from (a resumed run's losses cut back to its checkpoint)."""
        self.path = Path(path)
        self.columns = columns
        self.history: dict[str, list[float]] = {c: [] for c in columns}
        if rows is not None:
            atomic_write_bytes(self.path, rows)
            self.history = parse_losses(rows.decode().split("\n"), self.path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        if new:
            self._file.write(",".join(columns) + "\n")
            self._file.flush()

    def append(self, row: dict[str, float]) -> None:
        self._file.write(",".join(_format(row[c]) for c in self.columns) + "\n")
        self._file.flush()
        for c in self.columns:
            self.history[c].append(float(_format(row[c])) if c != "step" else int(row[c]))

    def close(self) -> None:
        self._file.close()


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def _loss_lines(path: Path) -> list[str]:
    """losses.csv split at newlines; the last item is '' when the file ends with a whole row."""
    try:
        return Path(path).read_bytes().decode().split("\n")
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({type(exc).__name__})") from None


def _loss_row(line: str, n_columns: int) -> list[float] | None:
    """The numbers of one row, or None where the row is not n_columns numbers."""
    fields = line.split(",")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None
    return values if len(values) == n_columns else None


def read_losses(path: Path) -> dict[str, list[float]]:
    """Columns of losses.csv as lists; a partial last line (a run killed mid-write) is dropped."""
    return parse_losses(_loss_lines(path), path)


def parse_losses(lines: list[str], path: Path) -> dict[str, list[float]]:
    """losses.csv's lines (as _loss_lines splits them) as columns."""
    if not lines[0].startswith("step,loss"):
        raise RunDirError(f"{path} is not a losses.csv (expected a header starting with 'step,loss')")
    columns = lines[0].split(",")
    table: dict[str, list[float]] = {c: [] for c in columns}
    rows = lines[1:-1] if lines[-1] == "" else lines[1:]  # '' after the last newline is no row
    for i, line in enumerate(rows):
        values = _loss_row(line, len(columns))
        if values is None:
            if i == len(rows) - 1:  # torn last line of a killed run
                break
            raise RunDirError(f"{path} line {i + 2} is malformed: {line[:80]!r}")
        for c, v in zip(columns, values):
            table[c].append(v)
    table["step"] = [int(s) for s in table["step"]]
    return table


def losses_up_to(path: Path, columns: list[str], step: int) -> bytes:
    """losses.csv's header and rows for steps 1..step, checked; rows after step (written after the
    checkpoint, or torn by a kill) are left out. RunDirError if those rows are not all there."""
    header = ",".join(columns)
    if step == 0:
        return (header + "\n").encode()
    lines = _loss_lines(path)
    if lines[0] != header:
        raise RunDirError(f"{path} has header {lines[0][:80]!r}, expected {header!r}")
    for i, line in enumerate(lines[1 : step + 1], start=1):
        values = _loss_row(line, len(columns))
        whole = i < step or len(lines) > step + 1  # the checkpoint's own row must end with its newline
        if values is None or values[0] != i or not whole:
            raise RunDirError(f"{path} line {i + 1} is not the row of step {i}: {line[:80]!r} (the file is corrupt)")
    if len(lines) < step + 1:
        raise RunDirError(
            f"{path} ends at step {len(lines) - 1}, but the checkpoint is at step {step} (the file is corrupt)"
        )
    return ("\n".join(lines[: step + 1]) + "\n").encode()


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def final_loss(losses: list[float]) -> tuple[float, float, int]:
    """(mean, stderr, window) of the last FINAL_WINDOW step losses; NaNs where there are none."""
    window = losses[-FINAL_WINDOW:]
    if not window:
        return float("nan"), float("nan"), 0
    return (*mean_and_stderr(window), len(window))


# --- summary.json and the run's status ------------------------------------------------------------


def run_status(run_dir: Path) -> str:
    """summary.json's status; `running` where there is none. RunDirError for a corrupt summary."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return "running"
    status = read_json(path).get("status")
    if not isinstance(status, str) or status not in STATUSES:
        raise RunDirError(f"{path} has status {status!r}; allowed {', '.join(STATUSES)}")
    return status


def new_summary(
    status: str, step: int, settings: dict[str, Any], losses: list[float], facts: dict[str, Any]
) -> dict[str, Any]:
    """summary.json's dict for a run at `step`: its status, the run's settings (vae_cli.run.config.summary_settings),
    the final loss from the step losses, and the run's facts (device, speed, data, versions)."""
    mean, stderr, window = final_loss(losses[:step])
    return {
        "status": status,
        **settings,
        "steps": step,
        "final_loss": mean,
        "final_loss_stderr": stderr,
        "final_loss_window": window,
        "last_loss": losses[step - 1] if 0 < step <= len(losses) else float("nan"),
        **facts,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers summary.json takes from eval.json."""
    return {name: result[key] for key, name in HEADLINE.items() if key in result}


def write_evaluation(
    run_dir: Path, result: dict[str, Any], per_image: dict[str, list[float]], summary: dict[str, Any] | None
) -> dict[str, Any] | None:
    """eval.json, eval_images.csv and, where the run has a summary, summary.json with the headline
    numbers (written once, after the evaluation); returns the new summary."""
    run_dir = Path(run_dir)
    # eval_images.csv first, and eval.json names its digest: a kill between the two leaves a pair
    # that read_run does not take for one evaluation
    rows = per_image_csv(per_image)
    atomic_write_bytes(run_dir / EVAL_IMAGES, rows)
    write_json(run_dir / EVAL, {**result, EVAL_IMAGES_DIGEST: hashlib.sha256(rows).hexdigest()})
    if summary is None:
        return None
    # no headline number of an older evaluation stays beside the new ones
    kept = {key: value for key, value in summary.items() if key not in HEADLINE.values()}
    return write_summary(run_dir, {**kept, **headline(result)})


def forget_evaluation(run_dir: Path) -> None:
    """Remove eval.json and eval_images.csv: training goes on, so they describe parameters about to change."""
    for name in (EVAL, EVAL_IMAGES):
        (Path(run_dir) / name).unlink(missing_ok=True)


def per_image_csv(per_image: dict[str, list[float]]) -> bytes:
    """One row per test image: its index, then each estimator's and bound's value (empty where it
    was not computed for that image: the subsets)."""
    names = list(per_image)
    n = max((len(v) for v in per_image.values()), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *names])
    for i in range(n):
        writer.writerow([i, *(repr(float(per_image[k][i])) if i < len(per_image[k]) else "" for k in names)])
    return buffer.getvalue().encode()


def read_per_image(path: Path) -> dict[str, list[float]]:
    """eval_images.csv as columns; each estimator's column ends where its subset did."""
    try:
        rows = list(csv.reader(io.StringIO(Path(path).read_text())))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not rows or rows[0][:1] != ["image"]:
        raise RunDirError(f"{path} is not an {EVAL_IMAGES} (expected a header starting with 'image')")
    names = rows[0][1:]
    columns: dict[str, list[float]] = {name: [] for name in names}
    try:
        for i, row in enumerate(rows[1:]):
            if int(row[0]) != i or len(row) != len(names) + 1:
                raise ValueError(f"row {i + 2}")
            for name, cell in zip(names, row[1:]):
                if cell != "":
                    columns[name].append(float(cell))
    except (ValueError, IndexError) as exc:
        raise RunDirError(f"{path} is malformed ({exc})") from None
    return columns


# --- reading a run directory ---------------------------------------------------------------------


@dataclass
class RunFiles:
    """What a run directory says about itself, read once; any file may be missing."""

    path: Path
    name: str
    overrides: dict[str, str] = field(default_factory=dict)  # from .hydra/overrides.yaml, hydra.* left out
    config: dict[str, Any] | None = None  # .hydra/config.yaml, unresolved
    summary: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    per_image: dict[str, list[float]] | None = None
    losses: dict[str, list] | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each

    @property
    def completed(self) -> bool:
        """Training finished (its figures or evaluation may still be to come)."""
        return self.summary is not None and self.summary.get("status", "completed") in TRAINED

    @property
    def steps(self) -> int | None:
        """Steps trained: summary.json's count, else the last step in losses.csv."""
        if self.summary is not None and self.summary.get("steps") is not None:
            return self.summary["steps"]
        return self.losses["step"][-1] if self.losses and self.losses["step"] else None

    @property
    def status(self) -> str:
        """completed; `interrupted`/`failed` (as the run's summary.json says) or `partial` (no summary.json:
        still going, or killed), with the steps done."""
        if self.completed:
            return str(self.summary.get("status", "completed"))
        what = str(self.summary.get("status")) if self.summary is not None else "partial"
        total = (self.summary or {}).get("n_train_iters") or (self.config or {}).get("n_train_iters")
        return f"{what} ({self.steps or 0}/{total} steps)" if total else f"{what} ({self.steps or 0} steps)"

    @property
    def experiment(self) -> dict[str, str]:
        """The keys that define the run's experiment, each value written one way (vae_cli.run.config):
        from summary.json, else .hydra/config.yaml, else the overrides (runs of older versions)."""
        if self.summary is not None and isinstance(self.summary.get("experiment"), dict):
            return {k: str(v) for k, v in self.summary["experiment"].items()}
        if self.config is not None:
            return experiment_values(self.config)
        return experiment_values(_nested(self.overrides))


def _nested(flat: dict[str, str]) -> dict[str, Any]:
    """{'model.hidden': '8', 'objective': 'elbo'} -> {'model': {'hidden': 8}, 'objective': {'name': 'elbo'}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        parsed = yaml.safe_load(value) if value else value
        if len(parts) == 1 and key in GROUPS:
            node.setdefault(key, {})["name"] = parsed
        else:
            node[parts[-1]] = parsed
    return out


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['objective=jensen', '+sweep=n_samples', 'hydra.run.dir=x'] -> {'objective': 'jensen', 'sweep': 'n_samples'}."""
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra.") and not key.startswith("hydra/"):
            parsed[key] = value
    return parsed


def read_run(path: Path, name: str | None = None, strict: bool = False) -> RunFiles:
    """Read a run directory once. strict (resume, vae-eval, the Python API): a file that is there but
    cannot be read is a RunDirError naming it. Tolerant (vae-plot): it becomes a note, and RunDirError
    only when the run holds neither a readable summary.json nor a step in losses.csv."""
    path = Path(path)
    if strict and not path.is_dir():
        raise RunDirError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}")
    run = RunFiles(path=path, name=name or path.name)

    def attempt(filename: str, read) -> Any:
        if not (path / filename).exists():
            return None
        try:
            return read(path / filename)
        except RunDirError as exc:
            if strict:
                raise
            run.notes.append(str(exc))
        except Exception as exc:  # a foreign or hand-edited file: the run is still usable
            if strict:
                raise RunDirError(f"{path / filename} unreadable ({type(exc).__name__})") from None
            run.notes.append(f"{filename} unreadable ({type(exc).__name__})")
        return None

    overrides = attempt(HYDRA_OVERRIDES, lambda p: parse_overrides(list(yaml.safe_load(p.read_text()) or [])))
    run.overrides = overrides or {}
    run.config = attempt(HYDRA_CONFIG, _read_yaml)
    run.summary = attempt(SUMMARY, _read_summary)
    run.evaluation = attempt(EVAL, read_json)
    run.per_image = attempt(EVAL_IMAGES, read_per_image)
    if run.per_image is not None and not _written_with(run.evaluation, path / EVAL_IMAGES):
        run.notes.append(f"{EVAL_IMAGES} is not the one {EVAL} was written with (an evaluation stopped between them)")
        run.per_image = None
    run.losses = attempt(LOSSES, read_losses)
    if not strict and run.summary is None and not (run.losses and run.losses["step"]):
        reasons = "; ".join(run.notes) or f"no {SUMMARY} and no steps in {LOSSES}"
        raise RunDirError(f"{path} has nothing to compare: {reasons}")
    return run


def _written_with(evaluation: dict[str, Any] | None, per_image: Path) -> bool:
    if evaluation is None:
        return False
    return evaluation.get(EVAL_IMAGES_DIGEST) == hashlib.sha256(per_image.read_bytes()).hexdigest()


def _read_yaml(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise RunDirError(f"{path} does not hold a config")
    return config


def _read_summary(path: Path) -> dict[str, Any]:
    summary = read_json(path)
    if "final_loss" not in summary:
        raise RunDirError(f"{path} is not a vae-train summary (no final_loss)")
    return summary


def find_runs(path: Path) -> tuple[list[Path], list[str]]:
    """The run directories `path` names: itself, or the job directories of a multirun directory.
    Returns (run dirs, one-line notes about job directories that hold no run)."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory")
    if is_run_dir(path):
        return [path], []
    children = sorted((c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_job_order)
    runs = [c for c in children if is_run_dir(c)]
    notes = [
        f"{c}: no {LOSSES}, {CHECKPOINT} or {SUMMARY} (job not started, or failed before training)"
        for c in children
        if not is_run_dir(c) and (c / HYDRA_DIR).is_dir()
    ]
    if not runs and (notes or (path / MULTIRUN_YAML).exists()):
        raise RunDirError(f"{path} is a multirun directory where no job has started training")
    if not runs:
        raise RunDirError(
            f"{path} is neither a vae-train run directory (no {LOSSES}, {CHECKPOINT} or {SUMMARY}) "
            f"nor a multirun directory holding one{nearby_runs(path)}"
        )
    return runs, notes


NAMED = 4  # directories a line names before it counts the rest


def _listed(paths: list[Any]) -> str:
    more = f" and {len(paths) - NAMED} more" if len(paths) > NAMED else ""
    return ", ".join(str(p) for p in paths[:NAMED]) + more


def nearby_runs(path: Path) -> str:
    """For the line that refuses `path` as a run: "; <the run or multirun directories beneath it, or
    the one it lies in>", or "" where there is none within two levels."""
    path = Path(path)

    def job_dirs(folder: Path) -> list[Path]:
        try:
            children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
        except OSError:
            return []
        return sorted((c for c in children if is_run_dir(c)), key=_job_order)

    if path.is_dir():
        jobs = job_dirs(path)
        if jobs:  # a multirun directory given where one run is expected
            return f"; it is a multirun directory holding the runs {_listed(jobs)}: give one of them"
        sweeps, runs = [], []
        for child in sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")):
            if is_run_dir(child):
                runs.append(child)
            elif n := len(job_dirs(child)):
                sweeps.append(f"{child} ({n} run{'s' if n > 1 else ''})")
        if sweeps:
            return f"; the multirun directories beneath it: {_listed(sweeps)}"
        if runs:
            return f"; the run directories beneath it: {_listed(runs)}"
    for above in list(path.parents)[:2] if path.parts else []:
        if is_run_dir(above):
            return f"; it lies in the run directory {above}: give that one"
        if job_dirs(above) and above != path:
            return f"; it lies in the multirun directory {above}: give that one"
    return ""


def _job_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def collect(paths: list[Path]) -> tuple[list[RunFiles], list[str]]:
    """Every readable run under `paths` (run or multirun directories), read tolerantly, and one line per
    path or job skipped. Names are unique: a job's number in a single multirun, else the directory names joined."""
    runs: list[RunFiles] = []
    skipped: list[str] = []
    for path in paths:
        path = Path(path)
        try:
            run_dirs, notes = find_runs(path)
        except RunDirError as exc:
            skipped.append(str(exc))
            continue
        skipped += notes
        for run_dir in run_dirs:
            name = run_dir.name if len(paths) == 1 or run_dir == path else f"{path.name}-{run_dir.name}"
            try:
                runs.append(read_run(run_dir, name))
            except RunDirError as exc:
                skipped.append(str(exc))
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"
    return runs, skipped
