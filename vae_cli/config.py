"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore, and
`validate`, which checks every value before any data is loaded or file is written.

The YAML files under conf/ select and fill these schemas; a wrong type or an unknown
key is refused by OmegaConf, a wrong value or combination by `validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from vae_cli.errors import ConfigError

ACTIVATIONS = ("elu", "relu", "tanh", "gelu", "silu")
DEVICES = ("auto", "cpu", "cuda")
BINARIZATIONS = ("static", "dynamic")
DATASETS = ("mnist", "fashion_mnist", "synthetic")


@dataclass
class ObjectiveConfig:
    name: str = MISSING


@dataclass
class PriorObjectiveConfig(ObjectiveConfig):
    """Objectives that draw z from the prior p(z) only (no encoder)."""


@dataclass
class EncoderObjectiveConfig(ObjectiveConfig):
    """Objectives with a Gaussian encoder q(z|x) as proposal."""


@dataclass
class ModelConfig:
    hidden: int = 512  # width of every hidden layer
    depth: int = 3  # number of hidden layers of the decoder
    activation: str = "elu"
    # Encoder-only options; null means "mirror the decoder". Refused for objectives without an encoder.
    encoder_hidden: Optional[int] = None
    encoder_depth: Optional[int] = None


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str = "${oc.env:VAE_CLI_DATA,'~/.cache/vae-cli/data'}"
    download: bool = False
    binarization: str = "static"  # static: one seeded draw of the training set; dynamic: redrawn every batch
    # Only for name=synthetic (tests and smoke runs): sizes of the random binary images.
    n_train: int = 512
    n_test: int = 256


@dataclass
class Config:
    objective: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    K: int = 2
    n_samples: int = 128
    batch_size: int = 256
    n_train_iters: int = 1000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    micro_batch: int = 0  # images per forward/backward pass (gradients accumulated); 0 = auto
    progress: bool = True  # tqdm bar on stderr


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schemas/objective", name="prior", node=PriorObjectiveConfig)
    cs.store(group="schemas/objective", name="encoder", node=EncoderObjectiveConfig)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {key}={value!r}: allowed {allowed}")


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = _select(cfg, key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value, "an integer >= 1")


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _select(cfg, key)
    _require(value in allowed, key, value, "one of " + ", ".join(allowed))


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Check every value and combination; raise ConfigError with one line naming the first bad one."""
    from vae_cli.objectives import OBJECTIVES  # the registry is the list of allowed names

    for key in ("K", "n_samples", "batch_size", "n_train_iters", "model.hidden", "model.depth"):
        _positive_int(cfg, key)
    _require(cfg.micro_batch >= 0, "micro_batch", cfg.micro_batch, "an integer >= 0 (0 = automatic)")
    _require(isinstance(cfg.lr, float) and cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    _one_of(cfg, "objective.name", tuple(OBJECTIVES))
    _one_of(cfg, "device", DEVICES)
    _one_of(cfg, "model.activation", ACTIVATIONS)
    _one_of(cfg, "data.name", DATASETS)
    _one_of(cfg, "data.binarization", BINARIZATIONS)
    if cfg.data.name == "synthetic":
        _positive_int(cfg, "data.n_train")
        _positive_int(cfg, "data.n_test")
    objective = OBJECTIVES[cfg.objective.name]
    for key in ("encoder_hidden", "encoder_depth"):
        value = cfg.model[key]
        if value is None:
            continue
        if not objective.uses_encoder:
            encoders = ", ".join(name for name, o in OBJECTIVES.items() if o.uses_encoder)
            raise ConfigError(
                f"invalid option model.{key}={value!r}: objective={objective.name} has no encoder "
                f"(encoder options apply to {encoders})"
            )
        _positive_int(cfg, f"model.{key}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("invalid value device='cuda': CUDA is not available here; allowed auto, cpu")
