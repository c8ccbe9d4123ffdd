"""A method's config keys as plain dataclass fields: a default, one line of help and what the value
allows beyond its type. No torch, Hydra or omegaconf here: every method unit (a likelihood, an
objective, an estimator) declares its keys with these, and vae_cli.run.keys assembles the schema."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """What a key allows beyond its type: a test of the value and how the allowed values read."""

    allows: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(minimum: int, why: str = "") -> Check:
    return Check(lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}{why}")


def below(limit: int, text: str) -> Check:
    return Check(lambda v: _is_int(v) and 0 <= v < limit, f"an integer in [0, {text})")


POSITIVE = Check(
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
    "a finite number > 0",
)


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(choices))


def key(default: Any, help: str, check: Check | None = None, keeping: bool = False, on_resume: bool = False) -> Any:
    """A config key: its default, its one line of help, and what it allows beyond its type.

    keeping: the key says how a run is kept (where, how fast, how often it is saved), not what is
    trained: runs that differ only there are the same experiment, and `resume=` may change it.
    on_resume: an experiment key that `resume=` may change all the same (n_train_iters: more steps)."""
    return field(default=default, metadata={"help": help, "check": check, "keeping": keeping, "on_resume": on_resume})
