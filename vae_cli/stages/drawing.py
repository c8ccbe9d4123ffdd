"""Figures of one run: loss curves, 8x8 grids of samples x ~ p(x|z) and of decoder means E[x|z]
for the same prior draws z, and for K=2 the latent figures (the manifold of decoder means, the
exact posterior p(z|x) on a grid, the encoded test set). Headless (Agg); every PNG is written
atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Ellipse
from PIL import Image

from vae_cli.maths.densities import quadrature_grid
from vae_cli.maths.estimators import WeightedSums, weighted_sums
from vae_cli.maths.grid_posterior import POSTERIOR_GRID, GridPosterior, grid_posterior, zoom_window
from vae_cli.maths.models import LatentVariableModel, prior_draws
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import Z_LIMIT
from vae_cli.run.files import atomic_write_bytes
from vae_cli.run.rundir import MANIFOLD_GRID, POSTERIOR_DIGITS, SAMPLE_GRID

TILE = 28
PAD = 1
DPI = 100
TITLE_PX = 36  # two lines of 8-point text above an image grid


def new_figure(**kwargs) -> Figure:
    """A figure of its own, outside pyplot: drawing a run changes no global state (a notebook's backend stays)."""
    return Figure(dpi=DPI, **kwargs)


def subplots(*args, figsize: tuple[float, float], **kwargs):
    fig = new_figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig: Figure, path: Path, tight: bool = True) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
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


def tile(images: torch.Tensor | np.ndarray, nrow: int = SAMPLE_GRID, pad: int = PAD) -> np.ndarray:
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


def save_grid(
    images: torch.Tensor | np.ndarray, path: Path, title: str, nrow: int = SAMPLE_GRID, scale: int = 2
) -> None:
    """The tiled images pixel for pixel (each image pixel a scale x scale block) under a two-line title."""
    canvas = tile(images, nrow)
    h, w = canvas.shape[0] * scale, canvas.shape[1] * scale
    fig = new_figure(figsize=(w / DPI, (h + TITLE_PX) / DPI))
    ax = fig.add_axes((0, 0, 1, h / (h + TITLE_PX)))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.text(0.5, 1 - 2 / (h + TITLE_PX), title, ha="center", va="top", fontsize=8)
    save_figure(fig, path, tight=False)


def save_sample_grids(model: LatentVariableModel, samples_path: Path, means_path: Path, label: str) -> None:
    """Samples and the decoder means of the same prior draws, the means labelled as means (grey
    levels outside [0, 1], a Gaussian's noise, are drawn as black or white)."""
    means, samples = prior_draws(model, SAMPLE_GRID * SAMPLE_GRID)
    save_grid(samples, samples_path, f"samples x ~ p(x|z), z ~ p(z)\n{label}")
    save_grid(means, means_path, f"MEANS E[x|z] (not samples), same z\n{label}")


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


def save_loss_plot(losses: dict[str, list[float]], path: Path, label: str, objective: str, note: str = "") -> None:
    """The loss with the other bounds of the same samples on one axis (where they differ, that is the gap
    between them), each remaining term on its own axes below: every step faint, a moving average bold."""
    known = OBJECTIVES.get(objective)
    same_axis = [(what, cols) for what, cols in (known.same_axis if known else ()) if all(c in losses for c in cols)]
    shared = {c for _, cols in same_axis for c in cols if len(cols) == 1}
    terms = [c for c in losses if c not in ("step", "loss") and c not in shared]
    window = smoothing_window(len(losses["step"]))
    fig, axes = subplots(1 + len(terms), 1, figsize=(6.4, 2.6 * (1 + len(terms))), sharex=True, squeeze=False)
    steps = losses["step"]

    def curve(ax, values, color: str, name: str) -> None:
        ax.plot(steps, values, lw=0.5, alpha=0.35 if window > 1 else 1.0, color=color)
        ax.plot(steps, moving_average(values, window), lw=1.3, color=color, label=name)

    curve(axes[0, 0], losses["loss"], "C0", f"loss: {known.loss if known else 'loss'}")
    for i, (what, cols) in enumerate(same_axis):
        curve(axes[0, 0], np.sum([losses[c] for c in cols], axis=0), f"C{i + 1}", what)
    for ax, column in zip(axes[1:, 0], terms):
        curve(ax, losses[column], "C2", f"{column}: {known.terms.get(column, column) if known else column}")
    for ax in axes[:, 0]:
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    smoothing = f"faint: every step; bold: mean of {window} steps" if window > 1 else "every step"
    axes[0, 0].set_title(label + (f"\n{note}" if note else "") + f"\n{smoothing}; lower is better", fontsize=8)
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
    device = next(model.parameters()).device
    means = model.decode(z_grid(n).to(device)).cpu()
    title = f"MEANS E[x|z], z on a {n}x{n} grid over [-{Z_LIMIT:g}, {Z_LIMIT:g}]^2 (z1 ->, z2 up)\n{label}"
    save_grid(means, path, title, nrow=n, scale=1)


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
def save_posterior(
    model: LatentVariableModel, x: torch.Tensor, path: Path, label: str, quadrature: tuple[int, float]
) -> None:
    """Test digits over their exact posterior p(z|x): on the grid over [-3, 3]^2 next to the prior,
    and zoomed in on a second grid around each posterior; each digit's log p(x) and KL(p(z) || p(z|x))
    (= log p(x) - E_p(z) log p(x|z), the Jensen bound's gap) above it, summed on the evaluation's own
    grid (`quadrature`: points per dimension and half width), so they are eval_images.csv's numbers;
    q(z|x) as ellipses. Fixed layout (no tight bbox): many small axes are slow to lay out."""
    sums = posterior_numbers(model, x, *quadrature)
    full = grid_posterior(model, x)
    windows = [zoom_window(full, i) for i in range(len(x))]
    zooms = [grid_posterior(model, x[i : i + 1], center=c, limit=h) for i, (c, h) in enumerate(windows)]
    q = model.encode(x.float().to(next(model.parameters()).device)) if model.encoder is not None else None
    n = len(x)
    panel, gap, left, top, bottom, bar = 1.3, 0.45, 0.5, 0.75, 0.75, 0.9  # inches
    width, height = left + (n + 1) * (panel + gap) + bar, top + 3 * panel + 2 * gap + bottom
    fig = new_figure(figsize=(width, height))

    def axes(col: int, row: int, scale: float = 1.0) -> Axes:  # rows from the top: image, full grid, zoom
        y0 = bottom + (2 - row) * (panel + gap)
        return fig.add_axes(((left + col * (panel + gap)) / width, y0 / height, panel / width, panel * scale / height))

    def density(ax: Axes, post: GridPosterior, values: np.ndarray, title: str, col: int, row: int):
        shown = np.exp(values - values.max())  # each panel relative to its own peak: one colour bar serves all
        image = ax.imshow(shown, origin="lower", extent=post.extent, cmap="viridis", interpolation="nearest",
                          aspect="auto", vmin=0, vmax=1)  # fmt: skip
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6, length=2, pad=1)
        ax.locator_params(nbins=3)
        ax.set_xlabel("z1", fontsize=7, labelpad=1)
        if col == 0 or row == 2:
            ax.set_ylabel("z2", fontsize=7, labelpad=1)
        return image

    fig.text((left + panel / 2) / width, (bottom + 2.4 * (panel + gap)) / height, "prior p(z)\n(no image)",
             ha="center", va="center", fontsize=8)  # fmt: skip
    fig.text((left + panel / 2) / width, (bottom + panel / 2) / height, "zoomed in:\neach panel its\nown axes",
             ha="center", va="center", fontsize=8)  # fmt: skip
    image = density(axes(0, 1), full, full.log_prior, "p(z)", 0, 1)
    for i in range(n):
        image_ax = axes(i + 1, 0, scale=0.85)
        image_ax.imshow(x[i].reshape(TILE, TILE).cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        image_ax.axis("off")
        zoom = zooms[i]
        kl = float(sums.log_px[i] - sums.jensen[i])
        image_ax.set_title(f"log p(x) = {float(sums.log_px[i]):.1f}\nKL(p(z) || p(z|x)) = {kl:.2f}", fontsize=7)
        panels = [
            (axes(i + 1, 1), full, full.log_posterior[i], "p(z|x)", 1),
            (axes(i + 1, 2), zoom, zoom.log_posterior[0], "p(z|x), zoomed", 2),
        ]
        for ax, post, values, title, row in panels:
            density(ax, post, values, title, i + 1, row)
            if q is not None:
                mu, sd = q[0][i].cpu().numpy(), torch.exp(0.5 * q[1][i]).cpu().numpy()
                for k in (1, 2):
                    ax.add_patch(Ellipse(tuple(mu), 2 * k * sd[0], 2 * k * sd[1], fill=False, ec="white", lw=0.8,
                                         ls="-" if k == 1 else "--"))  # fmt: skip
                ax.set_xlim(post.extent[:2])
                ax.set_ylim(post.extent[2:])
    colour_bar = fig.add_axes(((width - bar + 0.1) / width, bottom / height, 0.12 / width, (2 * panel + gap) / height))
    fig.colorbar(image, cax=colour_bar).set_label("density / its peak", fontsize=7)
    colour_bar.tick_params(labelsize=6)
    q_note = "; white: q(z|x) at 1 and 2 sd" if q is not None else ""
    fig.suptitle(
        f"exact posterior p(z|x) = p(x|z)p(z)/p(x) on {POSTERIOR_GRID}x{POSTERIOR_GRID} grids: over [-{Z_LIMIT:g}, {Z_LIMIT:g}]^2, "
        f"then around its mean +- 5 sd{q_note}\n{label}",
        fontsize=8,
        y=1 - 0.08 / height,
        va="top",
    )
    fig.text(
        0.5,
        0.12 / height,
        "A posterior equal to the prior (KL = 0) means the image tells nothing about z: the decoder ignores z and "
        "draws the same mean image for every z,\nthe optimum of the Jensen bound E_p(z) log p(x|z) = log p(x) - "
        "KL(p(z) || p(z|x)). log p(x) by the evaluation's quadrature (eval_images.csv); KL = log p(x) - E_p(z) log p(x|z).",
        ha="center",
        va="bottom",
        fontsize=7,
    )
    save_figure(fig, path, tight=False)


def posterior_numbers(
    model: LatentVariableModel, x: torch.Tensor, points_per_dim: int, half_width: float
) -> WeightedSums:
    """log p(x) and E_p(z) log p(x|z) of each image on the evaluation's quadrature grid."""
    device = next(model.parameters()).device
    return weighted_sums(
        model, x.float().to(device), *quadrature_grid(model.K, points_per_dim, half_width, device), len(x)
    )


@torch.no_grad()
def save_encoded(model: LatentVariableModel, x: torch.Tensor, labels: torch.Tensor, path: Path, label: str) -> None:
    """The means of q(z|x) of the test set, coloured by digit."""
    device = next(model.parameters()).device
    mu = torch.cat([model.encode(xc.float().to(device))[0] for xc in x.split(2048)]).cpu().numpy()
    labels = labels.cpu().numpy()
    fig, ax = subplots(figsize=(5.2, 4.6))
    for c in range(10):
        sel = labels == c
        if sel.any():
            ax.scatter(
                mu[sel, 0], mu[sel, 1], s=1.5, alpha=0.5, color=colormaps["tab10"](c), label=str(c), rasterized=True
            )
    ax.add_patch(Circle((0, 0), 2, fill=False, ls="--", lw=0.8, color="0.4"))
    ax.set_aspect("equal")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.grid(alpha=0.3)
    ax.legend(markerscale=6, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="digit", title_fontsize=7)
    ax.set_title(
        f"encoded test set: means of q(z|x) for {len(mu):,} images (dashed: 2 sd of p(z))\n{label}", fontsize=8
    )
    save_figure(fig, path)


def save_gradient_snr(entry: dict, path: Path, label: str) -> None:
    """gradient_snr.png: the median SNR against the sample count, log-log, encoder and decoder side by side,
    one line per gradient estimator with its quartiles as a band, and the theory's slopes (+1/2 decoder,
    -1/2 encoder, Rainforth et al. 2018) as dashed guides through each side's first point."""
    sides = [s for s in ("encoder", "decoder") if any(s in m["slope"] for m in entry["estimators"].values())]
    fig, axes = subplots(1, len(sides), figsize=(4.8 * len(sides), 4), squeeze=False)
    counts = np.array(entry["counts"], dtype=float)
    for ax, side in zip(axes[0], sides):
        first = None
        for gradient, measured in entry["estimators"].items():
            rows = [measured["by_count"][str(n)][side] for n in entry["counts"]]
            keep = np.array([r["median"] is not None and r["median"] > 0 for r in rows])
            if not keep.any():
                continue
            median = np.array([r["median"] if k else np.nan for r, k in zip(rows, keep)], dtype=float)
            q1 = np.array([r["q1"] if k else np.nan for r, k in zip(rows, keep)], dtype=float)
            q3 = np.array([r["q3"] if k else np.nan for r, k in zip(rows, keep)], dtype=float)
            slope = measured["slope"][side]["slope"]
            text = f"{gradient} (slope {slope:+.2f})" if slope is not None else gradient
            (line,) = ax.plot(counts, median, "o-", label=text)
            ax.fill_between(counts, np.maximum(q1, 1e-12), q3, color=line.get_color(), alpha=0.15)
            first = first if first is not None else median[keep][0]
        if first is not None:
            ax.plot(counts, first * (counts / counts[0]) ** entry["theory"][side], "k--", lw=1,
                    label=f"theory, slope {entry['theory'][side]:+.1f}")  # fmt: skip
        if "noise_floor" in entry:
            ax.axhline(entry["noise_floor"], color="grey", ls=":", lw=1, label="noise floor of the replicates")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n_samples")
        ax.set_ylabel("median SNR |mean| / sd")
        ax.set_title(f"{side}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{label}: gradient signal-to-noise, {entry['objective']}", fontsize=10)
    save_figure(fig, path)
