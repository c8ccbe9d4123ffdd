"""AIS against the exact quadrature on every test image of K=2 runs (docs: Evaluation),
in chunks that survive an interruption:

    .venv/bin/python docs/ais_vs_quadrature.py OUT RUN [RUN ...] [--chunk 500] [--n-images 10000]
    .venv/bin/python docs/ais_vs_quadrature.py OUT RUN [RUN ...] --summary

Each run's eval settings (the defaults unless it changed them) and this machine's AIS gradient
dtype are used, as vae-eval would use them. The chunks go round the runs, so all of them advance
together; each chunk's per-image values are written to OUT/<run>/<first>-<end>.pt and a chunk
already there is not run again. Every image's draws are seeded by its index, so chunked values
equal those of one `vae-eval RUN --full` pass. --summary prints, per run, the images done, the
mean quadrature, AIS minus quadrature with its paired standard error, the spread of that
difference over images (sd, 1% and 99% quantiles, the count over 1 nat low, the worst image) and
the mean acceptance rate.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch

from vae_cli.maths.ais import ais
from vae_cli.run.checkpoint import load_model
from vae_cli.run.config import data_config, eval_config, model_spec
from vae_cli.run.data import load_images_here
from vae_cli.run.files import atomic_write_bytes
from vae_cli.run.machine import flush_denormals
from vae_cli.stages.estimates import (
    ESTIMATORS,
    Stopwatch,
    ais_batch_images,
    ais_settings,
    is_linear,
    mean_stderr,
    paired_difference,
    run_quadrature,
)

QUADRATURE = "quadrature.pt"


def save(path: Path, values: dict[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save(values, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class Check:
    """One K=2 run: its model, test images, eval settings and the folder of its chunks."""

    def __init__(self, run: Path, out: Path, n_images: int):
        cfg, self.model, _ = load_model(run)
        self.spec = model_spec(cfg)
        if self.model.K != 2:
            raise SystemExit(f"{run}: K={self.model.K}; the quadrature is exact at K=2 only")
        self.cfg_eval = eval_config(cfg.get("eval"))
        self.x = load_images_here(data_config(cfg), cfg.seed, torch.device("cpu")).test[:n_images]
        self.name = f"{run.name}-{cfg.objective.name}"
        self.folder = out / self.name

    def quadrature(self) -> torch.Tensor:
        path = self.folder / QUADRATURE
        if not path.exists():
            stopwatch = Stopwatch(self.x.device)
            with torch.no_grad():  # as in evaluate: no graph of 10k x 147456 decoder rows
                planned = ESTIMATORS["quadrature"].plan(self.spec, self.cfg_eval, self.x.device, len(self.x))
                per_image = run_quadrature(self.model, self.x, self.cfg_eval, planned, stopwatch)[1]
            save(path, {"quadrature": per_image["quadrature"]})
        return torch.load(path)["quadrature"]

    def chunk_path(self, first: int, end: int) -> Path:
        return self.folder / f"{first:05d}-{end:05d}.pt"

    def run_chunk(self, first: int, end: int) -> None:
        settings = ais_settings(self.cfg_eval, self.x.device, is_linear(self.model))
        start = time.perf_counter()
        result = ais(self.model, self.x[first:end], settings, ais_batch_images(self.cfg_eval), first=first)
        seconds = time.perf_counter() - start
        save(self.chunk_path(first, end), {"ais": result.estimate(), "acceptance": result.acceptance})
        print(f"{self.name} images {first}-{end}: {seconds:.0f} s ({settings.gradient_dtype} gradients)", flush=True)

    def done(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The AIS values and acceptance rates of the chunks there, in image order (the first
        images, without gaps)."""
        chunks = []
        for path in sorted(self.folder.glob("[0-9]*-[0-9]*.pt")):
            first = int(path.stem.split("-")[0])
            if first != sum(len(chunk["ais"]) for chunk in chunks):
                break
            chunks.append(torch.load(path))
        if not chunks:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0)
        return torch.cat([chunk["ais"] for chunk in chunks]), torch.cat([chunk["acceptance"] for chunk in chunks])

    def summary(self) -> str:
        estimate, acceptance = self.done()
        n = len(estimate)
        if n == 0:
            return f"{self.name}: no chunk yet"
        truth = self.quadrature()[:n].double()
        difference = paired_difference(estimate, truth)
        # The mean hides single images that the chains got wrong; the spread shows them.
        per_image = estimate.double() - truth
        low, high = torch.quantile(per_image, torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
        worst = int(per_image.argmin())
        return (
            f"{self.name}: {n} images, quadrature {mean_stderr(truth)['value']:.3f}, "
            f"AIS - quadrature {difference['value']:+.3f} (paired stderr {difference['stderr']:.3f}); "
            f"per image: sd {per_image.std():.3f}, 1% {low:+.3f}, 99% {high:+.3f}, "
            f"{int((per_image < -1).sum())} over 1 nat low, worst image {worst} ({per_image[worst]:+.3f}); "
            f"acceptance {acceptance.mean():.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    flush_denormals()
    checks = [Check(run, args.out, args.n_images) for run in args.runs]
    if not args.summary:
        for check in checks:
            check.quadrature()
        for first in range(0, args.n_images, args.chunk):
            end = min(first + args.chunk, args.n_images)
            for check in checks:
                if not check.chunk_path(first, end).exists():
                    check.run_chunk(first, end)
    for check in checks:
        print(check.summary())


if __name__ == "__main__":
    main()
