"""Run-directory I/O: every file is written atomically (temp file + rename), except
losses.csv, which is appended a whole line at a time so a killed run keeps its history.

A run directory holds:
    .hydra/         Hydra's composed config and overrides
    losses.csv      step,loss,<objective terms>
    loss.png, samples.png, means.png
    checkpoint.pt   {model, optimizer, step, rng, config, format}
    summary.json    headline numbers of the run
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import RunDirError

CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.csv"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} does not hold a JSON object")
    return obj


class LossLog:
    """Appends one CSV row per training step and flushes it, so the file is always usable."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        if new:
            self._file.write(",".join(columns) + "\n")
            self._file.flush()

    def append(self, row: dict[str, float]) -> None:
        self._file.write(",".join(_format(row[c]) for c in self.columns) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def read_losses(path: Path) -> dict[str, list[float]]:
    """Columns of losses.csv as lists; a partial last line (a run killed mid-write) is dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({exc})") from None
    if not lines or not lines[0].startswith("step,loss"):
        raise RunDirError(f"{path} is not a losses.csv (expected a header starting with 'step,loss')")
    reader = csv.reader(lines)
    columns = next(reader)
    table: dict[str, list[float]] = {c: [] for c in columns}
    rows = list(reader)
    for i, row in enumerate(rows):
        try:
            values = [float(v) for v in row]
        except ValueError:
            values = []
        if len(values) != len(columns):
            if i == len(rows) - 1:  # torn last line of a killed run
                break
            raise RunDirError(f"{path} line {i + 2} is malformed: {','.join(row)!r}")
        for c, v in zip(columns, values):
            table[c].append(v)
    table["step"] = [int(s) for s in table["step"]]
    return table


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Tensors and plain containers only (weights_only=True): a checkpoint cannot run code."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them: one line, ours
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise RunDirError(f"{path} is not a readable vae-cli checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunDirError(f"{path} has checkpoint format {found!r}; this vae-cli reads format {CHECKPOINT_FORMAT}")
    return state


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)
