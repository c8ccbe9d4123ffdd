"""A run's config checked and turned into the plain values the layers below take.

`validate(cfg)` checks every value before any data is loaded or file is written: each key against
what its schema allows (vae_cli.run.keys), then each rule across keys, once. `model_spec`,
`data_config`, `objective_options` and `experiment_values` hand the rest of vae-cli plain values.
`typed_config` types a saved config (a checkpoint's, .hydra/config.yaml) by this version's schema.

No torch here: a bad value is refused before torch is imported (the machine's own checks, CUDA
and memory, are in vae_cli.run.machine and the stages).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_cli.errors import ConfigError, RunDirError
from vae_cli.maths import likelihoods
from vae_cli.maths.likelihoods import LIKELIHOODS
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import LikelihoodSpec, ModelSpec
from vae_cli.run import keys
from vae_cli.run.keys import BINARIZATIONS, GREY_LEVELS, GROUPS, Config, FileDataConfig, default_text

_ABSENT = object()
# What runs saved before these groups existed used: a run directory of an older vae-cli has no
# model.name or likelihood node, and was an MLP with Bernoulli pixels.
LEGACY_CHOICES = {"data": "mnist", "model": "mlp", "likelihood": "bernoulli"}


def validate(cfg: DictConfig) -> None:
    """Check every key, value and combination; raise ConfigError with one line naming the first bad one.

    `cfg` may hold Hydra's own `hydra` node (as in a callback); it is not checked here."""
    try:
        for name in cfg:
            if name != "hydra":  # resolve every interpolation now, not halfway through a run
                _plain(cfg[name])
        for name, options in GROUPS.items():
            _check_choice(cfg, name, options)
        validate_section(cfg)
        for rule in RULES:
            rule(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"invalid config{f' at {key}' if key else ''}: {message}") from None


def eval_config(saved: DictConfig | None, overrides: dict[str, Any] | None = None) -> DictConfig:
    """A run's eval settings (defaults for keys it predates) with `overrides` (vae-eval's options), checked."""
    try:
        cfg_eval = OmegaConf.merge(OmegaConf.structured(keys.EvalConfig), saved or {}, overrides or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid eval setting: {str(exc).splitlines()[0]}") from None
    validate_section(cfg_eval, "eval")
    return cfg_eval


def validate_section(node: DictConfig, prefix: str = "") -> None:
    """Each key's own check, on the whole config or (prefix) on one of its sections."""
    start = prefix + "." if prefix else ""
    for k in keys.keys():
        if not k.path.startswith(start):
            continue
        value = OmegaConf.select(node, k.path[len(start) :], default=_ABSENT)
        if value is _ABSENT or (value is None and k.nullable):
            continue  # a key of another option of its group
        if k.check is not None and not k.check.allows(value):
            raise ConfigError(f"invalid value {k.path}={value!r}: allowed {k.check.allowed}")


def _plain(value: Any) -> Any:
    """A config value with every interpolation resolved (OmegaConf raises on a bad one or a ??? value)."""
    return OmegaConf.to_container(value, resolve=True, throw_on_missing=True) if OmegaConf.is_config(value) else value


def _check_choice(cfg: DictConfig, name: str, options: dict[str, tuple[type, str]]) -> None:
    """The group's node is the option its name says: `objective.name=elbo` on jensen's node is refused."""
    node = cfg[name]
    choice = node.name
    if choice not in options or OmegaConf.get_type(node) is not options[choice][0]:
        raise ConfigError(
            f"invalid value {name}.name={choice!r}: the option of group {name} is chosen with {name}=NAME, "
            f"one of {', '.join(options)}"
        )


# --- rules across keys, each once --------------------------------------------------------------------


def _encoder_options_need_an_encoder(cfg: DictConfig) -> None:
    if OBJECTIVES[cfg.objective.name].uses_encoder:
        return
    for option in ("encoder_hidden", "encoder_depth"):
        value = cfg.model.get(option)
        if value is not None:
            encoders = ", ".join(name for name, objective in OBJECTIVES.items() if objective.uses_encoder)
            raise ConfigError(
                f"invalid option model.{option}={value!r}: objective={cfg.objective.name} has no encoder "
                f"(encoder options apply to {encoders})"
            )


def _objective_rules(cfg: DictConfig) -> None:
    for rule in OBJECTIVES[cfg.objective.name].rules:
        if refusal := rule(cfg):
            raise ConfigError(refusal)


def _likelihood_fits_the_pixels(cfg: DictConfig) -> None:
    """The likelihood models the images the data gives (binary or grey levels), then its own rules."""
    unit, node, binarization = LIKELIHOODS[cfg.likelihood.name], cfg.likelihood, cfg.data.binarization
    pixels = likelihoods.GREY if binarization == GREY_LEVELS else likelihoods.BINARY
    if unit.pixels != pixels and not unit.waives_pixels(node):
        allowed = [b for b in BINARIZATIONS if (b == GREY_LEVELS) == (unit.pixels == likelihoods.GREY)]
        others = [name for name, other in LIKELIHOODS.items() if other.pixels == pixels]
        words = {likelihoods.GREY: "grey levels", likelihoods.BINARY: "binary images"}
        raise ConfigError(
            f"invalid value data.binarization={binarization} with likelihood={unit.name}: it models "
            f"{words[unit.pixels]}; allowed {' or '.join(allowed)}"
            + (f", or likelihood={' or '.join(others)} for {words[pixels]}" if others else "")
            + (f", or {unit.waiver}" if unit.waiver else "")
        )
    for rule in unit.rules:
        if refusal := rule(node, binarization):
            raise ConfigError(refusal)


def _logger_package_installed(cfg: DictConfig) -> None:
    missing = missing_logger_package(cfg.logger)
    if missing:
        raise ConfigError(missing)


RULES = (
    _encoder_options_need_an_encoder,
    _objective_rules,
    _likelihood_fits_the_pixels,
    _logger_package_installed,
)


def missing_logger_package(logger: str) -> str | None:
    """One line saying that the logger's optional package is not installed; None when it is."""
    if logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return (
            "invalid value logger=tensorboard: the tensorboard package is not installed "
            "(pip install 'vae-cli[tensorboard]'; make setup installs it); allowed csv"
        )
    return None


# --- plain values for the layers below --------------------------------------------------------------


def likelihood_spec(cfg: DictConfig) -> LikelihoodSpec:
    return LIKELIHOODS[cfg.likelihood.name].spec(cfg.likelihood)


def model_spec(cfg: DictConfig) -> ModelSpec:
    """The model's shape from cfg.K, cfg.model and cfg.likelihood; the MLP encoder (for objectives that
    have one) mirrors the decoder unless model.encoder_hidden / encoder_depth say otherwise."""
    m = cfg.model
    uses_encoder = OBJECTIVES[cfg.objective.name].uses_encoder
    likelihood = likelihood_spec(cfg)
    if m.name == "linear":
        return ModelSpec(cfg.K, "linear", likelihood, encoder="linear" if uses_encoder else None)
    spec = ModelSpec(cfg.K, "mlp", likelihood, hidden=m.hidden, depth=m.depth, activation=m.activation)
    if not uses_encoder:
        return spec
    hidden = m.encoder_hidden if m.encoder_hidden is not None else m.hidden
    depth = m.encoder_depth if m.encoder_depth is not None else m.depth
    return ModelSpec(**{**spec.__dict__, "encoder": "mlp", "encoder_hidden": hidden, "encoder_depth": depth})


def data_config(cfg: DictConfig, root: str | None = None) -> keys.DataConfig:
    """cfg.data as a plain dataclass (interpolations resolved), its root replaced by `root` if given."""
    data = OmegaConf.to_object(cfg.data)
    if root is not None and isinstance(data, FileDataConfig):
        data.root = root
    return data


def objective_options(cfg: DictConfig) -> dict[str, Any]:
    """The keyword options of the run's objective function: its config node less its name."""
    return {k: v for k, v in OmegaConf.to_container(cfg.objective, resolve=True).items() if k != "name"}


def decodes_shared_latents(cfg: DictConfig) -> bool:
    """The decoder runs once for the whole batch (shared prior samples, exact's grid), as the objective says."""
    return OBJECTIVES[cfg.objective.name].decodes_shared(cfg.objective)


def mutable_on_resume() -> list[str]:
    """The keys `vae-train resume=DIR KEY=VALUE` may change, a section as `eval.*`: those that say how
    a run is kept, and n_train_iters (more steps)."""
    found: list[str] = []
    for k in keys.keys():
        if k.mutable_on_resume:
            name = k.path.split(".")[0] + ".*" if k.in_keeping_section else k.path
            if name not in found:
                found.append(name)
    return found


def experiment_values(config: dict[str, Any]) -> dict[str, str]:
    """The keys that define a run's experiment (every key but those that say how it is kept), flat,
    each value written the way the command line writes it (`true`, not `True`): what vae-plot compares
    runs by. `config` is a plain (saved) config; the group choices come first, by their name."""
    values: dict[str, str] = {}
    for name in GROUPS:
        node = config.get(name)
        choice = node.get("name") if isinstance(node, dict) else LEGACY_CHOICES.get(name)
        if choice is not None:
            values[name] = str(choice)
    for k in keys.keys():
        if k.keeping:
            continue
        value = _select(config, k.path)
        if value is not _ABSENT and (not k.options or values.get(k.group) in k.options):
            values[k.path] = default_text(value)
    return values


def _select(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def summary_settings(cfg: DictConfig) -> dict[str, Any]:
    """What summary.json records of the config: the headline keys, the model's shape in words, and every
    key that defines the experiment (vae-plot compares runs by these)."""
    return {
        "objective": cfg.objective.name,
        "K": cfg.K,
        "n_samples": cfg.n_samples,
        "batch_size": cfg.batch_size,
        "n_train_iters": cfg.n_train_iters,
        "seed": cfg.seed,
        "model": model_description(cfg),
        "experiment": experiment_values(OmegaConf.to_container(cfg, resolve=True)),
    }


def model_description(cfg: DictConfig) -> str:
    """The model in a few words, for titles: "mlp 3x512 elu, bernoulli" or "linear, gaussian (learned sigma)"."""
    m, likelihood = cfg.model, LIKELIHOODS[cfg.likelihood.name].words(cfg.likelihood)
    shape = "linear" if m.name == "linear" else f"mlp {m.depth}x{m.hidden} {m.activation}"
    return f"{shape}, {likelihood}"


# --- saved configs -------------------------------------------------------------------------------------


def typed_config(saved: Any, source: Path) -> DictConfig:
    """A run's saved config (checkpoint.pt or .hydra/config.yaml) typed by this version's schema:
    a key this version does not know, or a value of the wrong type, is a RunDirError. Keys the run
    predates get their defaults; groups it predates, the choices runs then had (LEGACY_CHOICES)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("objective"), dict):
        raise RunDirError(f"{source} does not hold a vae-cli config")
    saved = {k: v for k, v in saved.items() if k != "hydra"}
    try:
        typed = OmegaConf.structured(Config)
        for name, options in GROUPS.items():
            node = dict(saved.get(name) or {})
            choice = node.setdefault("name", LEGACY_CHOICES.get(name))
            if choice not in options:
                raise ValueError(f"{name} {choice!r} is not one of {', '.join(options)}")
            if name == "data" and choice != "synthetic":  # runs from before the per-data-set schemas
                node = {k: v for k, v in node.items() if k not in ("n_train", "n_test")}
            typed[name] = OmegaConf.merge(OmegaConf.structured(options[choice][0]), node)
        rest = {k: v for k, v in saved.items() if k not in GROUPS}
        typed = OmegaConf.merge(typed, rest)
    except (OmegaConfBaseException, ValueError, TypeError, AttributeError) as exc:
        raise RunDirError(f"{source} is from another vae-cli version or program: {str(exc).splitlines()[0]}") from None
    return typed


# --- what the command line may name -------------------------------------------------------------------


def closest(name: str, candidates: list[str]) -> list[str]:
    """The candidates that read like `name` (a typo), closest first."""
    return difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)


def did_you_mean(name: str, candidates: list[str]) -> str:
    found = closest(name, candidates)
    return f"did you mean {' or '.join(found)}? " if found else ""
