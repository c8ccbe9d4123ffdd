"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore, and
`validate`, which checks every value before any data is loaded or file is written.

The YAML files under conf/ select and fill these schemas; a wrong type or an unknown
key is refused by OmegaConf, a wrong value or combination by `validate`, a size the machine
cannot hold by `check_memory`. `model_spec`, `data_config` and `micro_batch_size` turn a
config into the plain values the layers below take.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_cli.ais import AISSettings
from vae_cli.device import DEVICES, available_bytes, cpu_has_bf16, has_native_bf16, resolve_device
from vae_cli.errors import ConfigError, RunDirError
from vae_cli.models import N_PIXELS, QUADRATURE_MAX_K, ModelSpec
from vae_cli.objectives import OBJECTIVES

ACTIVATIONS = ("elu", "relu", "tanh", "gelu", "silu")
BINARIZATIONS = ("static", "dynamic")
DATASETS = ("mnist", "fashion_mnist", "synthetic")
LOGGERS = ("csv", "tensorboard")  # vae_cli.tracking: csv is losses.csv alone; tensorboard adds event files


@dataclass
class ObjectiveConfig:
    name: str = MISSING


@dataclass
class PriorObjectiveConfig(ObjectiveConfig):
    """Objectives that draw z from the prior p(z) only (no encoder)."""

    # One set of n_samples prior draws per step, shared by every image of the batch: the decoder
    # runs on n_samples latents instead of batch_size x n_samples. Same expectation; the samples
    # are correlated across images, so the gradient noise differs (README, Speed).
    shared_samples: bool = False


@dataclass
class ExactObjectiveConfig(ObjectiveConfig):
    """objective=exact (K <= 2): log p(x) by the midpoint rule on a grid shared by the batch."""

    grid_points: int = 96  # per dimension: 96^2 = 9216 decoder rows a step (the default prior sampling decodes 32768)
    half_width: float = 6.0  # the grid covers [-half_width, half_width]^K


@dataclass
class EncoderObjectiveConfig(ObjectiveConfig):
    """Objectives with a Gaussian encoder q(z|x) as proposal."""


@dataclass
class ModelConfig:
    hidden: int = 512  # width of every hidden layer
    depth: int = 3  # number of hidden layers of the decoder
    activation: str = "elu"
    # Encoder-only options; null means "mirror the decoder". Refused for objectives without an encoder.
    encoder_hidden: int | None = None
    encoder_depth: int | None = None


@dataclass
class DataConfig:
    """MNIST and Fashion-MNIST: torchvision's files under root."""

    name: str = "mnist"
    root: str = "${oc.env:VAE_CLI_DATA,'~/.cache/vae-cli/data'}"
    download: bool = False
    binarization: str = "static"  # static: one seeded draw of the training set; dynamic: redrawn every batch


@dataclass
class SyntheticDataConfig(DataConfig):
    """Tiny random binary images (tests and smoke runs): only their sizes are set."""

    name: str = "synthetic"
    n_train: int = 512
    n_test: int = 256


@dataclass
class EvalConfig:
    """Test-set log p(x) and the bounds' gaps (vae_cli.evaluation), at the end of training and by vae-eval."""

    enabled: bool = True  # evaluate at the end of training
    n_images: int | None = None  # the first n test images; null = the whole test set
    batch_size: int = 1000  # images per pass; no result depends on it
    quadrature_points: int = 147456  # grid points in all (K <= 2): 384^2 for K=2, 147456 for K=1
    quadrature_half_width: float = 6.0  # the grid covers [-w, w]^K
    importance_k: int | None = None  # draws from q(z|x) per image; null = 5000 on CUDA, 1000 on the CPU
    # Images for importance sampling with q (and the ELBO and IWAE-k from the same draws): the first
    # N of those evaluated; null = all on CUDA, 1000 on the CPU (a tenth of the time); 0 = all.
    importance_n_images: int | None = None
    iwae_k: int = 128  # k of the IWAE-k bound, from the same draws (capped at importance_k)
    prior_mc_samples: int = 10000  # prior draws shared by every image
    # Annealed importance sampling (vae_cli.ais), the estimator of log_px where K > 2, certified by
    # BDMC on images simulated from the model. null: where K > 2 (vae-eval also where K <= 2, next to
    # the exact quadrature: its --no-ais leaves it out); true: at every K; false: never.
    ais: bool | None = None
    ais_steps: int = AISSettings.steps  # intermediate distributions, on the sigmoid schedule
    ais_chains: int = AISSettings.chains  # chains per image
    ais_leapfrog: int = AISSettings.leapfrog  # leapfrog steps per HMC transition
    ais_step_size: float = AISSettings.step_size  # the initial HMC step size, adapted per chain
    # The leapfrog's gradient from a bf16 copy of the decoder; the energies of the accept test and
    # the weights stay float32, so the estimate is still the float32 model's (vae_cli.ais). null:
    # where the device multiplies bf16 natively (avx512_bf16 or AMX CPUs, CUDA); false: float32.
    ais_bf16_gradients: bool | None = None
    ais_n_images: int | None = None  # the first N of those evaluated; null = 32 on the CPU, all on CUDA; 0 = all
    bdmc_n_images: int | None = None  # images simulated for BDMC; null = 8 on the CPU, 100 on CUDA; 0 = none
    seed: int = 0


@dataclass
class CudaConfig:
    """CUDA-only speed options. Each changes numbers beyond float32 round-off, so all are off by default."""

    tf32: bool = False  # TF32 tensor-core matmuls (inputs rounded to a 10-bit mantissa)
    bf16: bool = False  # bf16 autocast of the forward pass; the likelihood itself stays float32


@dataclass
class CpuConfig:
    """CPU-only speed options, off by default."""

    # bf16 autocast of the decoder's matrix products (the likelihood stays float32); needs a CPU with
    # native bf16 instructions (avx512_bf16 or AMX). README, Speed: the tolerance it was measured to hold.
    bf16: bool = False


@dataclass
class Config:
    objective: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING  # a DataConfig, or a SyntheticDataConfig for data=synthetic
    K: int = 2
    n_samples: int = 128
    batch_size: int = 256
    n_train_iters: int = 1000
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    micro_batch: int = 0  # images per forward/backward pass (gradients accumulated); 0 = auto
    progress: bool = True  # tqdm bar on stderr
    checkpoint_every: int = 100  # steps between checkpoints (also written at step 0, at the end, on SIGINT/SIGTERM)
    resume: str | None = None  # a run directory: continue it in place from its last checkpoint
    eval: EvalConfig = field(default_factory=EvalConfig)
    cuda: CudaConfig = field(default_factory=CudaConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    compile: bool = False  # torch.compile the decoder and likelihood (CPU or CUDA); compiles during the first steps
    logger: str = "csv"  # csv: losses.csv; tensorboard: also TensorBoard event files in the run directory


def register_configs() -> None:
    # conf/config.yaml: `${vae_cli.if_set:${resume},A,B}` is A when resume= is given, else B, so that
    # `vae-train resume=DIR` runs in DIR and keeps DIR/.hydra (see vae_cli.pipeline).
    if not OmegaConf.has_resolver("vae_cli.if_set"):
        OmegaConf.register_new_resolver(
            "vae_cli.if_set", lambda value, then, otherwise: otherwise if value is None else then
        )
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schemas/objective", name="prior", node=PriorObjectiveConfig)
    cs.store(group="schemas/objective", name="encoder", node=EncoderObjectiveConfig)
    cs.store(group="schemas/objective", name="exact", node=ExactObjectiveConfig)
    cs.store(group="schemas/data", name="files", node=DataConfig)
    cs.store(group="schemas/data", name="synthetic", node=SyntheticDataConfig)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {key}={value!r}: allowed {allowed}")


def _int_at_least(cfg: DictConfig, key: str, minimum: int, why: str = "") -> None:
    value = _select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _require(ok, key, value, f"an integer >= {minimum}{why}")


def _positive_int(cfg: DictConfig, key: str) -> None:
    _int_at_least(cfg, key, 1)


def _positive_number(cfg: DictConfig, key: str) -> None:
    value = _select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    _require(ok, key, value, "a finite number > 0")


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _select(cfg, key)
    _require(value in allowed, key, value, "one of " + ", ".join(allowed))


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Check every key, value and combination; raise ConfigError with one line naming the first bad one.

    `cfg` may hold Hydra's own `hydra` node (as in a callback); it is not checked here."""
    try:
        for key in cfg:
            if key != "hydra":  # resolve every interpolation now, not halfway through a run
                _plain(cfg[key])
        if OmegaConf.is_dict(cfg.get("objective")) and "name" in cfg.objective:  # it picks the objective's schema
            _one_of(cfg, "objective.name", tuple(OBJECTIVES))
        unknown = next(_unknown_keys(cfg, Config, ""), None)
        if unknown is not None:
            raise ConfigError(unknown)
        _validate_values(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"invalid config{f' at {key}' if key else ''}: {message}") from None


def _unknown_keys(cfg: DictConfig, schema: type, prefix: str) -> Iterator[str]:
    """One line per key of cfg the dataclass `schema` does not declare, or declares and cfg lacks
    (`+key=`/`++key=` add keys a structured config would refuse; `~key` deletes them)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg:
        if prefix == "" and key == "hydra":
            continue
        if key not in fields:
            allowed = ", ".join(fields)
            yield f"unknown key {prefix}{key}={_plain(cfg[key])!r}: allowed keys{f' of {prefix[:-1]}' if prefix else ''} are {allowed}"
            continue
        nested = _nested_schema(fields[key], cfg[key])
        if nested is not None and OmegaConf.is_dict(cfg[key]):
            yield from _unknown_keys(cfg[key], nested, f"{prefix}{key}.")
    for key in fields:
        if key not in cfg:
            yield f"missing key {prefix}{key}: it is required (was it deleted with ~{prefix}{key}?)"


def _plain(value: Any) -> Any:
    """A config value with every interpolation resolved (OmegaConf raises on a bad one or a ??? value)."""
    return OmegaConf.to_container(value, resolve=True, throw_on_missing=True) if OmegaConf.is_config(value) else value


def objective_schema(node: Any) -> type:
    """The schema of an objective node: prior or encoder objective by its name (the base one if unknown)."""
    objective = OBJECTIVES.get(node.get("name")) if OmegaConf.is_dict(node) else None
    if objective is None:
        return ObjectiveConfig
    if objective.name == "exact":
        return ExactObjectiveConfig
    return EncoderObjectiveConfig if objective.uses_encoder else PriorObjectiveConfig


def data_schema(node: Any) -> type:
    """The schema of a data node: the synthetic one has sizes, the others files."""
    return SyntheticDataConfig if OmegaConf.is_dict(node) and node.get("name") == "synthetic" else DataConfig


def _nested_schema(f: dataclasses.Field, node: Any = None) -> type | None:
    if f.name == "objective" and f.default is MISSING:  # Any in the schema, an ObjectiveConfig in practice
        return objective_schema(node)
    if f.name == "data" and f.default is MISSING:  # likewise a DataConfig
        return data_schema(node)
    factory = f.default_factory
    return factory if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else None


def _validate_values(cfg: DictConfig) -> None:
    for key in ("K", "n_samples", "batch_size", "n_train_iters", "model.hidden", "model.depth"):
        _positive_int(cfg, key)
    _require(cfg.micro_batch >= 0, "micro_batch", cfg.micro_batch, "an integer >= 0 (0 = automatic)")
    _require(isinstance(cfg.lr, float) and math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a finite number > 0")
    _require(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**63, "seed", cfg.seed, "an integer in [0, 2^63)")
    _positive_int(cfg, "checkpoint_every")
    _require(
        cfg.resume is None or (isinstance(cfg.resume, str) and cfg.resume.strip() != ""),
        "resume",
        cfg.resume,
        "a run directory",
    )
    _one_of(cfg, "objective.name", tuple(OBJECTIVES))
    _one_of(cfg, "device", DEVICES)
    _one_of(cfg, "model.activation", ACTIVATIONS)
    _one_of(cfg, "data.name", DATASETS)
    _one_of(cfg, "data.binarization", BINARIZATIONS)
    _one_of(cfg, "logger", LOGGERS)
    if missing := missing_logger_package(cfg):
        raise ConfigError(missing)
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
    validate_eval(cfg)
    validate_speed(cfg)
    check_memory(cfg, resolve_device(cfg.device, quiet=True))


def missing_logger_package(cfg: DictConfig) -> str | None:
    """One line saying that cfg.logger's optional package is not installed; None when it is."""
    if cfg.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return (
            "invalid value logger=tensorboard: the tensorboard package is not installed "
            "(pip install 'vae-cli[tensorboard]'; make setup installs it); allowed csv"
        )
    return None


def validate_speed(cfg: DictConfig) -> None:
    """objective.shared_samples, cuda.*, cpu.*, compile: the combinations they allow."""
    if cfg.objective.name == "exact":
        _require(
            cfg.K <= QUADRATURE_MAX_K,
            "K",
            cfg.K,
            f"K <= {QUADRATURE_MAX_K} with objective=exact (a grid over "
            "the latent space: beyond 2 dimensions it cannot resolve the posterior)",
        )
        _int_at_least(cfg, "objective.grid_points", 4, " (the halving check uses half as many)")
        _positive_number(cfg, "objective.half_width")
    if cfg.objective.get("shared_samples", False) and 0 < cfg.micro_batch < cfg.batch_size:
        raise ConfigError(
            f"invalid value micro_batch={cfg.micro_batch!r} with objective.shared_samples=true: the shared samples "
            f"are drawn once per step for the whole batch; allowed 0 (automatic) or >= batch_size={cfg.batch_size}"
        )
    for key in ("tf32", "bf16"):
        if not cfg.cuda[key]:
            continue
        if cfg.device == "cpu" or not torch.cuda.is_available():
            where = "device=cpu" if cfg.device == "cpu" else "CUDA is not available here"
            raise ConfigError(f"invalid value cuda.{key}=True: a CUDA-only option ({where}); allowed false")
    if cfg.cpu.bf16:
        if resolve_device(cfg.device, quiet=True).type != "cpu":
            raise ConfigError(
                "invalid value cpu.bf16=True: a CPU-only option (this run is on CUDA: cuda.bf16); allowed false"
            )
        if not cpu_has_bf16():
            raise ConfigError(
                "invalid value cpu.bf16=True: this CPU has no native bf16 instructions (avx512_bf16 or amx_bf16), "
                "where bf16 matmuls are slower than float32; allowed false"
            )


def validate_eval(cfg: DictConfig) -> None:
    """The eval.* values of cfg (a Config, or any node with an `eval` child)."""
    for key in ("batch_size", "iwae_k", "prior_mc_samples", "ais_steps", "ais_chains", "ais_leapfrog"):
        _positive_int(cfg, f"eval.{key}")
    _positive_number(cfg, "eval.ais_step_size")
    _int_at_least(cfg, "eval.quadrature_points", 16, " (the convergence check halves the spacing)")
    for key in ("n_images", "importance_k"):
        if _select(cfg, f"eval.{key}") is not None:
            _positive_int(cfg, f"eval.{key}")
    if cfg.eval.importance_n_images is not None:
        _int_at_least(
            cfg, "eval.importance_n_images", 0, f" (0 = all) or null ({device_defaults(IMPORTANCE_N_IMAGES)})"
        )
    if cfg.eval.ais_n_images is not None:
        _int_at_least(cfg, "eval.ais_n_images", 0, f" (0 = all) or null ({device_defaults(AIS_N_IMAGES)})")
    if cfg.eval.bdmc_n_images is not None:
        _int_at_least(cfg, "eval.bdmc_n_images", 0, f" (0 = no BDMC) or null ({device_defaults(BDMC_N_IMAGES)})")
    _positive_number(cfg, "eval.quadrature_half_width")
    _require(
        isinstance(cfg.eval.seed, int) and 0 <= cfg.eval.seed < 2**31,
        "eval.seed",
        cfg.eval.seed,
        "an integer in [0, 2^31)",
    )


# --- plain values for the layers below --------------------------------------------------------------


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The model's shape from cfg.K and cfg.model; the encoder (for objectives that have one) mirrors
    the decoder unless model.encoder_hidden / encoder_depth say otherwise."""
    m = cfg.model
    if not OBJECTIVES[cfg.objective.name].uses_encoder:
        return ModelSpec(cfg.K, m.hidden, m.depth, m.activation)
    hidden = m.encoder_hidden if m.encoder_hidden is not None else m.hidden
    depth = m.encoder_depth if m.encoder_depth is not None else m.depth
    return ModelSpec(cfg.K, m.hidden, m.depth, m.activation, encoder_hidden=hidden, encoder_depth=depth)


def data_config(cfg: DictConfig, root: str | None = None) -> DataConfig:
    """cfg.data as a plain DataConfig (interpolations resolved), its root replaced by `root` if given."""
    data = OmegaConf.to_object(cfg.data)
    if not isinstance(data, DataConfig):  # an untyped node (a config composed without the schemas)
        data = data_schema(cfg.data)(**OmegaConf.to_container(cfg.data, resolve=True))
    if root is not None:
        data = dataclasses.replace(data, root=root)
    return data


def saved_config(saved: Any, source: Path) -> DictConfig:
    """A run's saved config (checkpoint.pt or .hydra/config.yaml) typed by this version's schema:
    a key this version does not know, or a value of the wrong type, is a RunDirError. Keys the
    run predates get their defaults."""
    if not isinstance(saved, dict):
        raise RunDirError(f"{source} does not hold a vae-cli config")
    try:
        objective = saved.get("objective") or {}
        data = dict(saved.get("data") or {"name": "mnist"})
        if data.get("name") != "synthetic":  # runs from before the per-data-set schemas kept the synthetic sizes
            data = {k: v for k, v in data.items() if k not in ("n_train", "n_test")}
        typed = OmegaConf.merge(
            OmegaConf.structured(Config), {k: v for k, v in saved.items() if k not in ("objective", "data")}
        )
        typed.objective = OmegaConf.merge(
            OmegaConf.structured(objective_schema(OmegaConf.create(objective))), objective
        )
        typed.data = OmegaConf.merge(OmegaConf.structured(data_schema(OmegaConf.create(data))), data)
    except (OmegaConfBaseException, ValueError, TypeError, AttributeError) as exc:
        raise RunDirError(f"{source} is from another vae-cli version or program: {str(exc).splitlines()[0]}") from None
    return typed


# On the CPU, glibc serves blocks over 32 MiB with fresh mmaps that page-fault on every step;
# micro-batches whose logits stay under this many floats (16 MiB) are reused from the heap.
CPU_MICRO_BATCH_ELEMENTS = 1 << 22


def objective_options(cfg: DictConfig) -> dict[str, Any]:
    """The keyword options of the run's objective function: its config node less its name."""
    return {k: v for k, v in OmegaConf.to_container(cfg.objective, resolve=True).items() if k != "name"}


def decodes_shared_latents(cfg: DictConfig) -> bool:
    """The decoder runs once for the whole batch: shared prior samples, or exact's grid."""
    return bool(cfg.objective.get("shared_samples", False)) or cfg.objective.name == "exact"


def micro_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """Images per forward/backward pass. Gradients are accumulated, so the step is the same."""
    if cfg.micro_batch > 0:
        return min(cfg.micro_batch, cfg.batch_size)
    if device.type == "cuda" or decodes_shared_latents(cfg):  # shared: logits are (latents, 784)
        return cfg.batch_size
    return max(1, min(cfg.batch_size, CPU_MICRO_BATCH_ELEMENTS // (cfg.n_samples * N_PIXELS)))


# --- sizes the machine can hold ---------------------------------------------------------------------

FLOAT = 4  # bytes of a float32
MNIST_IMAGES = 70_000
IMPORTANCE_K = {"cuda": 5000, "cpu": 1000}  # draws per image when eval.importance_k is null
IMPORTANCE_N_IMAGES = {"cuda": 0, "cpu": 1000}  # images when eval.importance_n_images is null (0: all)
AIS_N_IMAGES = {"cuda": 0, "cpu": 32}  # images when eval.ais_n_images is null (0: all)
BDMC_N_IMAGES = {"cuda": 100, "cpu": 8}  # simulated images when eval.bdmc_n_images is null


def _per_device(value: int | None, defaults: dict[str, int], device: torch.device) -> int:
    """An eval size: its value where set, else the device's default (the CPU's for any other device)."""
    return defaults.get(device.type, defaults["cpu"]) if value is None else value


def device_defaults(defaults: dict[str, int]) -> str:
    """How a per-device default reads in messages and help: "32 on the CPU, all on CUDA"."""
    return ", ".join(f"{defaults[d] or 'all'} on {name}" for d, name in (("cpu", "the CPU"), ("cuda", "CUDA")))


def _subset(n: int, n_images: int) -> int:
    """The first n of n_images images (0: all of them)."""
    return n_images if n == 0 else min(n, n_images)


def importance_sizes(cfg_eval: Any, device: torch.device, n_images: int) -> tuple[int, int]:
    """(draws per image, images) of importance sampling with q for cfg_eval on `device`, out of n_images."""
    k = _per_device(cfg_eval.importance_k, IMPORTANCE_K, device)
    return k, _subset(_per_device(cfg_eval.importance_n_images, IMPORTANCE_N_IMAGES, device), n_images)


def ais_sizes(cfg_eval: Any, device: torch.device, n_images: int) -> tuple[int, int]:
    """(test images, simulated images for BDMC) of AIS for cfg_eval on `device`, out of n_images."""
    n = _subset(_per_device(cfg_eval.ais_n_images, AIS_N_IMAGES, device), n_images)
    return n, _per_device(cfg_eval.bdmc_n_images, BDMC_N_IMAGES, device)


def ais_settings(cfg_eval: Any, device: torch.device) -> AISSettings:
    """The AIS schedule, chains and seed of cfg_eval, with the gradient's dtype on `device`."""
    bf16 = has_native_bf16(device) if cfg_eval.ais_bf16_gradients is None else cfg_eval.ais_bf16_gradients
    return AISSettings(
        steps=cfg_eval.ais_steps,
        chains=cfg_eval.ais_chains,
        leapfrog=cfg_eval.ais_leapfrog,
        step_size=cfg_eval.ais_step_size,
        seed=cfg_eval.seed,
        gradient_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


# AIS decodes this many times eval.batch_size latents a pass: on the 2-core CPU its bf16 passes of
# 1000 latents (62 images x 16 chains) ran 30% slower than passes of 2000; float32 ones 4% slower.
AIS_LATENTS_PER_BATCH_IMAGE = 2


def ais_batch_images(cfg_eval: Any) -> int:
    """Images per AIS pass: AIS_LATENTS_PER_BATCH_IMAGE x eval.batch_size latents in all, as many chains a piece."""
    return max(1, AIS_LATENTS_PER_BATCH_IMAGE * cfg_eval.batch_size // cfg_eval.ais_chains)


# Adam keeps two moments beside each parameter and its gradient; a checkpoint copies both once more.
BYTES_PER_PARAMETER = 6 * FLOAT
# A layer's output is kept for the backward and its gradient made there: two copies of each activation.
ACTIVATION_COPIES = 2


def _mlp_parameters(sizes: list[int]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def memory_parts(cfg: DictConfig, device: torch.device) -> list[tuple[str, int]]:
    """(the keys that set it, bytes) for each large allocation of a run on `device`: estimates from
    the layer sizes, within a small factor of what torch allocates (the check is for sizes that
    are off by orders of magnitude, not for tuning)."""
    spec = model_spec(cfg)
    decoder = [spec.K] + [spec.hidden] * spec.depth + [N_PIXELS]
    params = _mlp_parameters(decoder)
    pass_width = spec.hidden * spec.depth + N_PIXELS  # floats a decoder row keeps for the backward
    if spec.encoder_hidden is not None:
        params += _mlp_parameters(
            [N_PIXELS] + [spec.encoder_hidden] * (spec.encoder_depth or spec.depth) + [2 * spec.K]
        )
    images = cfg.data.n_train + cfg.data.n_test if cfg.data.name == "synthetic" else MNIST_IMAGES
    micro = micro_batch_size(cfg, device)
    shared = decodes_shared_latents(cfg)
    latents = cfg.objective.grid_points**cfg.K if cfg.objective.name == "exact" else cfg.n_samples
    rows = latents if shared else micro * cfg.n_samples
    parts = [
        ("model.hidden, model.depth", params * BYTES_PER_PARAMETER),
        ("data", 2 * images * N_PIXELS * FLOAT),
        ("batch_size", 2 * cfg.batch_size * N_PIXELS * FLOAT),
        (
            "n_samples, batch_size, micro_batch, model.hidden",
            ACTIVATION_COPIES * rows * pass_width * FLOAT + (micro * cfg.n_samples * FLOAT if shared else 0),
        ),
    ]
    if cfg.eval.enabled:
        parts += eval_memory_parts(cfg, device)
    return parts


def eval_memory_parts(cfg: DictConfig, device: torch.device) -> list[tuple[str, int]]:
    """The evaluation's large allocations: the quadrature grid (K <= 2, built in float64), the shared
    prior draws, the importance draws (B, k, K) with their (B, k) weights. The decoder's chunks are
    bounded by design."""
    e = cfg.eval
    images = e.n_images or 10_000
    batch = min(e.batch_size, images)
    parts = [("eval.prior_mc_samples", 3 * e.prior_mc_samples * cfg.K * FLOAT)]
    if cfg.K <= QUADRATURE_MAX_K:
        parts.append(("eval.quadrature_points", 4 * e.quadrature_points * (cfg.K + 1) * 2 * FLOAT))
    if OBJECTIVES[cfg.objective.name].uses_encoder:
        k, _ = importance_sizes(e, device, images)
        parts.append(("eval.importance_k, eval.batch_size", 4 * batch * k * (cfg.K + 1) * FLOAT))
    if e.ais is not False:  # every draw of a batch of images made up front: momenta and accept uniforms for every step
        latents = ais_batch_images(e) * e.ais_chains
        parts.append(("eval.ais_steps, eval.batch_size", e.ais_steps * latents * (cfg.K + 1) * FLOAT))
    return parts


def check_memory(cfg: DictConfig, device: torch.device, parts: list[tuple[str, int]] | None = None) -> None:
    """ConfigError naming the keys of the largest allocation when the run needs more memory than
    `device` has available, before any data is loaded or file written."""
    parts = memory_parts(cfg, device) if parts is None else parts
    needed = sum(size for _, size in parts)
    available = available_bytes(device)
    if needed <= available:
        return
    keys, size = max(parts, key=lambda part: part[1])
    values = ", ".join(
        f"{k}={OmegaConf.select(cfg, k)}" for k in keys.split(", ") if OmegaConf.select(cfg, k) is not None
    )
    raise ConfigError(
        f"too large for this machine: {values} need about {_gib(size)} ({_gib(needed)} in all) on {device.type}, "
        f"{_gib(available)} available; allowed: smaller values of {keys}"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"
