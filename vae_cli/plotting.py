"""Figures of one run: loss curves, 8x8 grids of samples x ~ p(x|z) and of decoder means
sigmoid(decoder(z)) for the same prior draws z, and for K=2 the latent figures (the
manifold of decoder means, the exact posterior p(z|x) on a grid, the encoded test set).
Headless (Agg); every PNG is written atomically."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from PIL import Image  # noqa: E402

from vae_cli.models import (  # noqa: E402
    LatentVariableModel,
    bernoulli_log_likelihood,
    prior_draws,
    standard_normal_log_prob,
)
from vae_cli.rundir import atomic_write_bytes  # noqa: E402

GRID = 8
TILE = 28
PAD = 1
DPI = 100
TITLE_PX = 36  # two lines of 8-point text above an image grid
Z_LIMIT = 3.0  # the latent figures cover z in [-Z_LIMIT, Z_LIMIT]^2
MANIFOLD_GRID = 15  # decoder means on a 15x15 grid of z
POSTERIOR_GRID = 101  # p(z|x) on a 101x101 grid (spacing 0.06)
POSTERIOR_DIGITS = 5  # test digits shown next to the prior


def save_figure(fig: plt.Figure, path: Path, tight: bool = True) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)
    atomic_write_bytes(path, compact_png(buffer.getvalue()))


def compact_png(png: bytes) -> bytes:
    """Matplotlib's RGBA PNG as a 256-colour palette image: exact grey levels when the figure has
    no colour, else a median-cut palette. A third of the bytes or less; readers still get RGB(A)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    rgb = np.asarray(image)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        image = Image.frombytes("P", image.size, np.ascontiguousarray(rgb[..., 0]).tobytes())
        image.putpalette([level for i in range(256) for level in (i, i, i)])
    else:
        image = image.quantize(256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def tile(images: torch.Tensor | np.ndarray, nrow: int = GRID, pad: int = PAD) -> np.ndarray:
    """(N, 784) images -> one (nrow*29+1, ncol*29+1) array with a grey border between tiles."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, TILE, TILE)
    ncol = int(np.ceil(len(images) / nrow))
    canvas = np.full((nrow * (TILE + pad) + pad, ncol * (TILE + pad) + pad), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        top, left = pad + r * (TILE + pad), pad + c * (TILE + pad)
        canvas[top : top + TILE, left : left + TILE] = image
    return canvas


def grid_pixels(n_rows: int, n_cols: int, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_grid` writes for an n_rows x n_cols grid."""
    return (n_cols * (TILE + PAD) + PAD) * scale, (n_rows * (TILE + PAD) + PAD) * scale + TITLE_PX


def save_grid(images: torch.Tensor | np.ndarray, path: Path, title: str, nrow: int = GRID, scale: int = 2) -> None:
    """The tiled images pixel for pixel (each image pixel a scale x scale block) under a two-line title."""
    canvas = tile(images, nrow)
    h, w = canvas.shape[0] * scale, canvas.shape[1] * scale
    fig = plt.figure(figsize=(w / DPI, (h + TITLE_PX) / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, h / (h + TITLE_PX)))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.text(0.5, 1 - 2 / (h + TITLE_PX), title, ha="center", va="top", fontsize=8)
    save_figure(fig, path, tight=False)


def save_sample_grids(model: LatentVariableModel, samples_path: Path, means_path: Path, label: str) -> None:
    """Binary samples and the decoder means of the same prior draws, the means labelled as means."""
    means, samples = prior_draws(model, GRID * GRID)
    save_grid(samples, samples_path, f"samples x ~ p(x|z), z ~ p(z)\n{label}")
    save_grid(means, means_path, f"MEANS sigmoid(decoder(z)) (not samples), same z\n{label}")


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def smoothing_window(n_steps: int) -> int:
    return max(1, n_steps // 50)


def save_loss_plot(losses: dict[str, list[float]], path: Path, label: str, note: str = "") -> None:
    """The loss, and each objective term on its own axes below it: every step, and a moving average."""
    terms = [c for c in losses if c not in ("step", "loss")]
    window = smoothing_window(len(losses["step"]))
    fig, axes = plt.subplots(1 + len(terms), 1, figsize=(6, 2.4 * (1 + len(terms))), sharex=True, squeeze=False)
    for ax, column in zip(axes[:, 0], ["loss", *terms]):
        ax.plot(
            losses["step"], losses[column], lw=0.6, alpha=0.4 if window > 1 else 1.0, color="C0", label="every step"
        )
        if window > 1:
            ax.plot(
                losses["step"],
                moving_average(losses[column], window),
                lw=1.2,
                color="C1",
                label=f"mean of {window} steps",
            )
        ax.set_ylabel(f"{column} (nats)")
        ax.grid(alpha=0.3)
    if window > 1:
        axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, 0].set_title(label + (f"\n{note}" if note else ""), fontsize=9)
    axes[-1, 0].set_xlabel("step")
    save_figure(fig, path)


# --- K=2: the latent space --------------------------------------------------------------------------


def z_grid(n: int, limit: float = Z_LIMIT) -> torch.Tensor:
    """(n*n, 2) points of an n x n grid over [-limit, limit]^2, row-major from the top left:
    z1 grows left to right, z2 grows bottom to top (as on a plot)."""
    axis = torch.linspace(-limit, limit, n)
    z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1)


@torch.no_grad()
def save_manifold(model: LatentVariableModel, path: Path, label: str, n: int = MANIFOLD_GRID) -> None:
    means = torch.sigmoid(model.decode(z_grid(n))).cpu()
    title = f"MEANS sigmoid(decoder(z)), z on a {n}x{n} grid over [-{Z_LIMIT:g}, {Z_LIMIT:g}]^2 (z1 ->, z2 up)\n{label}"
    save_grid(means, path, title, nrow=n, scale=1)


@dataclass
class GridPosterior:
    """p(z|x) = p(x|z) p(z) / p(x) on the points of a square grid, normalized over the grid in log space."""

    z1: np.ndarray  # (n,) grid coordinates along z1 (columns)
    z2: np.ndarray  # (n,) grid coordinates along z2 (rows, bottom to top: draw with origin="lower")
    log_prior: np.ndarray  # (n, n) log p(z_g) normalized over the grid
    log_posterior: np.ndarray  # (N, n, n) log p(z_g | x_i) normalized over the grid
    log_px: np.ndarray  # (N,) quadrature estimate log sum_g p(x|z_g) p(z_g) dA

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (float(self.z1[0]), float(self.z1[-1]), float(self.z2[0]), float(self.z2[-1]))

    def moments(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (per axis) of p(z|x_i) on the grid."""
        p = np.exp(self.log_posterior[i].astype(np.float64))
        g2, g1 = np.meshgrid(self.z2, self.z1, indexing="ij")
        mean = np.array([(p * g1).sum(), (p * g2).sum()])
        sd = np.sqrt(np.array([(p * (g1 - mean[0]) ** 2).sum(), (p * (g2 - mean[1]) ** 2).sum()]))
        return mean, sd


@torch.no_grad()
def grid_posterior(
    model: LatentVariableModel,
    x: torch.Tensor,
    n: int = POSTERIOR_GRID,
    limit: float = Z_LIMIT,
    center: tuple[float, float] = (0.0, 0.0),
) -> GridPosterior:
    """The exact posterior of a K=2 model for each image in x (N, 784) on an n x n grid over
    center + [-limit, limit]^2."""
    offsets = torch.linspace(-limit, limit, n, dtype=torch.float64)
    z1_axis, z2_axis = (center[0] + offsets).float(), (center[1] + offsets).float()
    z2, z1 = torch.meshgrid(z2_axis, z1_axis, indexing="ij")  # row index = z2 increasing, for origin="lower"
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1)
    logits = model.decode(z)  # (G, 784), shared by every image
    log_pz = standard_normal_log_prob(z)  # (G,)
    log_joint = torch.stack([bernoulli_log_likelihood(xi[None], logits[None])[0] for xi in x.float()]) + log_pz
    log_norm = torch.logsumexp(log_joint, dim=-1, keepdim=True)
    cell = 2 * math.log(2 * limit / (n - 1))
    return GridPosterior(
        z1=z1_axis.numpy(),
        z2=z2_axis.numpy(),
        log_prior=(log_pz - torch.logsumexp(log_pz, 0)).reshape(n, n).numpy(),
        log_posterior=(log_joint - log_norm).reshape(len(x), n, n).numpy(),
        log_px=(log_norm[:, 0] + cell).numpy(),
    )


def zoom_window(post: GridPosterior, i: int) -> tuple[tuple[float, float], float]:
    """(center, half width) of a square around p(z|x_i): its mean +- 5 sd, at least two grid cells,
    at most the whole [-3, 3]^2. A sharp posterior fills one cell of the full grid; this resolves it."""
    mean, sd = post.moments(i)
    spacing = float(post.z1[1] - post.z1[0])
    half = float(min(Z_LIMIT, max(5 * sd.max(), 2 * spacing)))
    return (float(mean[0]), float(mean[1])), half


def pick_digits(labels: torch.Tensor, n: int = POSTERIOR_DIGITS) -> list[int]:
    """Indices of the first test image of each class 0, 1, ..., n-1 (the first images where a class is absent)."""
    chosen: list[int] = []
    for c in range(n):
        hits = (labels == c).nonzero()
        if len(hits):
            chosen.append(int(hits[0]))
    for i in range(len(labels)):
        if len(chosen) >= min(n, len(labels)):
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


@torch.no_grad()
def save_posterior(model: LatentVariableModel, x: torch.Tensor, path: Path, label: str) -> None:
    """Test digits over their exact posterior p(z|x): on the grid over [-3, 3]^2 next to the prior,
    and zoomed in on a second grid around each posterior, where log p(x) is summed; q(z|x) as ellipses.
    Fixed layout (no tight bbox): many small axes are slow to lay out."""
    full = grid_posterior(model, x)
    windows = [zoom_window(full, i) for i in range(len(x))]
    zooms = [grid_posterior(model, x[i : i + 1], center=c, limit=h) for i, (c, h) in enumerate(windows)]
    q = model.encode(x.float()) if model.encoder is not None else None
    n = len(x)
    panel, gap, left, top, bottom = 1.3, 0.35, 0.35, 0.45, 0.3  # inches
    width, height = left + (n + 1) * (panel + gap), top + 3 * panel + 2 * gap + bottom
    fig = plt.figure(figsize=(width, height), dpi=DPI)

    def axes(col: int, row: int, scale: float = 1.0) -> plt.Axes:  # rows from the top: image, full grid, zoom
        y0 = bottom + (2 - row) * (panel + gap)
        return fig.add_axes(((left + col * (panel + gap)) / width, y0 / height, panel / width, panel * scale / height))

    def density(ax: plt.Axes, post: GridPosterior, values: np.ndarray, title: str, show_y: bool) -> None:
        ax.imshow(
            np.exp(values), origin="lower", extent=post.extent, cmap="viridis", interpolation="nearest", aspect="auto"
        )
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6, length=2, pad=1, labelleft=show_y)
        ax.locator_params(nbins=3)

    fig.text(
        (left + panel / 2) / width,
        (bottom + 2.4 * (panel + gap)) / height,
        "prior p(z)\n(no image)",
        ha="center",
        va="center",
        fontsize=8,
    )
    fig.text(
        (left + panel / 2) / width,
        (bottom + panel / 2) / height,
        "zoomed in:\neach panel its\nown axes",
        ha="center",
        va="center",
        fontsize=8,
    )
    density(axes(0, 1), full, full.log_prior, "p(z)", show_y=True)
    for i in range(n):
        image_ax = axes(i + 1, 0, scale=0.85)
        image_ax.imshow(x[i].reshape(TILE, TILE).cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        image_ax.axis("off")
        zoom = zooms[i]
        panels = [
            (axes(i + 1, 1), full, full.log_posterior[i], "p(z|x)"),
            (axes(i + 1, 2), zoom, zoom.log_posterior[0], f"log p(x)={zoom.log_px[0]:.1f}"),
        ]
        for ax, post, values, title in panels:
            density(ax, post, values, title, show_y=post is zoom)
            if q is not None:
                mu, sd = q[0][i].cpu().numpy(), torch.exp(0.5 * q[1][i]).cpu().numpy()
                for k in (1, 2):
                    ax.add_patch(
                        Ellipse(
                            tuple(mu),
                            2 * k * sd[0],
                            2 * k * sd[1],
                            fill=False,
                            ec="white",
                            lw=0.8,
                            ls="-" if k == 1 else "--",
                        )
                    )
                ax.set_xlim(post.extent[:2])
                ax.set_ylim(post.extent[2:])
    q_note = "; white: q(z|x) at 1 and 2 sd" if q is not None else ""
    fig.suptitle(
        f"exact posterior p(z|x) = p(x|z)p(z)/p(x) on {POSTERIOR_GRID}x{POSTERIOR_GRID} grids: over [-3, 3]^2, "
        f"then around its mean +- 5 sd{q_note}\nlog p(x) by quadrature on the zoomed grid; {label}",
        fontsize=8,
        y=1 - 0.08 / height,
        va="top",
    )
    save_figure(fig, path, tight=False)


@torch.no_grad()
def save_encoded(model: LatentVariableModel, x: torch.Tensor, labels: torch.Tensor, path: Path, label: str) -> None:
    """The means of q(z|x) of the test set, coloured by digit."""
    mu = torch.cat([model.encode(xc.float())[0] for xc in x.split(2048)]).cpu().numpy()
    labels = labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for c in range(10):
        sel = labels == c
        if sel.any():
            ax.scatter(mu[sel, 0], mu[sel, 1], s=1.5, alpha=0.5, color=plt.cm.tab10(c), label=str(c), rasterized=True)
    ax.add_patch(plt.Circle((0, 0), 2, fill=False, ls="--", lw=0.8, color="0.4"))
    ax.set_aspect("equal")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.grid(alpha=0.3)
    ax.legend(markerscale=6, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="digit", title_fontsize=7)
    ax.set_title(
        f"encoded test set: means of q(z|x) for {len(mu):,} images (dashed: 2 sd of p(z))\n{label}", fontsize=8
    )
    save_figure(fig, path)
