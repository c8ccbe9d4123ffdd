"""Figures of a run: loss curves, 8x8 grids of samples x ~ p(x|z) and of decoder means
sigmoid(decoder(z)) for the same prior draws z. Headless (Agg); every PNG is written atomically."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vae_cli.models import LatentVariableModel  # noqa: E402
from vae_cli.rundir import atomic_write_bytes  # noqa: E402

GRID = 8
GRID_SEED = 2024  # the grids use their own generator: redrawing a run gives the same images


def save_figure(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def tile(images: torch.Tensor | np.ndarray, nrow: int = GRID, pad: int = 1) -> np.ndarray:
    """(N, 784) images -> one (nrow*29+1, ncol*29+1) array with a grey border between tiles."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    ncol = int(np.ceil(len(images) / nrow))
    canvas = np.full((nrow * (28 + pad) + pad, ncol * (28 + pad) + pad), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[pad + r * (28 + pad) : pad + r * (28 + pad) + 28, pad + c * (28 + pad) : pad + c * (28 + pad) + 28] = image
    return canvas


def save_grid(images: torch.Tensor | np.ndarray, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.2, 4.6))
    ax.imshow(tile(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    save_figure(fig, path)


@torch.no_grad()
def prior_draws(model: LatentVariableModel, n: int = GRID * GRID, seed: int = GRID_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means sigmoid(decoder(z)) and binary samples x ~ p(x|z) for n fixed prior draws z ~ p(z)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.K, generator=g)
    device = next(model.parameters()).device
    means = torch.sigmoid(model.decode(z.to(device))).cpu()
    samples = torch.bernoulli(means, generator=g)
    return means, samples


def save_sample_grids(model: LatentVariableModel, out_dir: Path, label: str) -> None:
    means, samples = prior_draws(model)
    save_grid(samples, out_dir / "samples.png", f"samples x ~ p(x|z), z ~ p(z)\n{label}")
    save_grid(means, out_dir / "means.png", f"MEANS sigmoid(decoder(z)) (not samples), same z\n{label}")


def save_loss_plot(losses: dict[str, list[float]], path: Path, label: str, note: str = "") -> None:
    """The loss, and each objective term on its own axes below it."""
    terms = [c for c in losses if c not in ("step", "loss")]
    fig, axes = plt.subplots(1 + len(terms), 1, figsize=(6, 2.6 * (1 + len(terms))), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], ["loss", *terms]):
        ax.plot(losses["step"], losses[column], lw=0.8)
        ax.set_ylabel(f"{column} (nats)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(label + (f"\n{note}" if note else ""), fontsize=9)
    axes[-1, 0].set_xlabel("step")
    save_figure(fig, path)
