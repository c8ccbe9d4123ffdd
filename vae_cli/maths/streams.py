"""One random-stream scheme for every evaluation draw: a stream per (seed, purpose, index).

Each stream is numpy's PCG64 seeded by SeedSequence(seed, spawn_key=(purpose, index)), which is
made for exactly this: streams keyed by distinct spawn keys are independent, and no two keys reach
the same stream. A torch generator could not serve: its CPU seed keeps only the low 32 bits
(`manual_seed(5)` and `manual_seed(2**32 + 5)` draw the same numbers), so seeds built as
`(seed << 32) + index` let eval.seed change nothing. The draws are made on the CPU in float32 and
moved to the device, so an image's numbers are the same on every device and in every batch.

A purpose is a short name ("importance", "ais", "ais.pilot", "bdmc.simulate", ...), owned by the
estimator that draws from it; its CRC-32 is the first element of the spawn key.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def stream(seed: int, purpose: str, index: int = 0) -> np.random.Generator:
    """The generator of draw `index` (an image, or 0 for draws shared by all) for `purpose` under `seed`."""
    key = (zlib.crc32(purpose.encode()), index)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def normal(generator: np.random.Generator, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Standard normal draws of `shape` from `generator`, float32, on `device`."""
    return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)).to(device)


def uniform(generator: np.random.Generator, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Uniform draws on [0, 1) of `shape` from `generator`, float32, on `device`."""
    return torch.from_numpy(generator.random(shape, dtype=np.float32)).to(device)


def torch_generator(generator: np.random.Generator) -> torch.Generator:
    """A CPU torch generator seeded from `generator`'s stream, for samplers that take a torch generator
    (a likelihood's sample): its 32-bit seed is itself a draw of the stream, not a formula of the key."""
    return torch.Generator().manual_seed(int(generator.integers(2**32)))
