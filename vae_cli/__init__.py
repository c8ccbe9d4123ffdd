"""vae-cli: see why the Jensen bound of prior samples fails, next to log-mean-exp and the ELBO.

The Python API (vae_cli.api): load_run, Run, test_images, train_images, train. It is loaded on
first use, so that `import vae_cli` and the console scripts start without torch or matplotlib."""

import importlib

__version__ = "0.1.0"
__all__ = ["Run", "load_run", "test_images", "train", "train_images"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("vae_cli.api"), name)
    raise AttributeError(f"module 'vae_cli' has no attribute {name!r}")
