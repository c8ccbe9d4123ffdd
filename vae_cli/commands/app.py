"""vae-train's side of Hydra: the schema registered with Hydra's ConfigStore (each group's options
from vae_cli.run.keys, so conf/ holds choices only), the resolvers its configs use, the check of
a command line before Hydra composes it (an unknown key gets the closest valid names), composing a
config in-process (the Python API, the tests, the benchmark), and the text of `vae-train --help`
and of README's key table, both made from the schema."""

from __future__ import annotations

from importlib.resources import files

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from vae_cli.errors import ConfigError, UserError
from vae_cli.run import keys
from vae_cli.run.config import closest, did_you_mean
from vae_cli.run.keys import GROUPS, Config, shown_default

CONFIG_MODULE = "vae_cli.conf"
CONFIG_NAME = "config"


def register_configs() -> None:
    """The schema and every group option, in Hydra's ConfigStore; the resolvers conf/ uses."""
    if not OmegaConf.has_resolver("vae_cli.if_set"):
        # conf/config.yaml: `${vae_cli.if_set:${resume},A,B}` is A when resume= is given, else B, so that
        # `vae-train resume=DIR` runs in DIR and keeps DIR/.hydra (see vae_cli.stages.pipeline).
        OmegaConf.register_new_resolver(
            "vae_cli.if_set", lambda value, then, otherwise: otherwise if value is None else then
        )
        OmegaConf.register_new_resolver("vae_cli.help", lambda part: HELP_PARTS[part]())
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group_name, options in GROUPS.items():
        for option, (schema, _) in options.items():
            cs.store(group=group_name, name=option, node=schema(name=option))


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `vae-train OVERRIDES` runs with, composed in-process, the command line checked first."""
    check_overrides(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


# --- the command line, before Hydra ---------------------------------------------------------------------


def conf_groups() -> dict[str, list[str]]:
    """Every config group the command line may choose from: the schema's and conf/'s (sweep, experiment, demo)."""
    groups = {name: list(options) for name, options in GROUPS.items()}
    for folder in files(CONFIG_MODULE).iterdir():
        if folder.is_dir() and folder.name != "hydra":
            groups[folder.name] = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))
    return groups


def default_choices() -> dict[str, str]:
    """The option each schema group starts from, as conf/config.yaml's defaults list says."""
    config = yaml.safe_load(files(CONFIG_MODULE).joinpath(f"{CONFIG_NAME}.yaml").read_text())
    found = {}
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            for group_name, option in entry.items():
                if group_name in GROUPS:
                    found[group_name] = option
    return found


def check_overrides(lines: list[str]) -> None:
    """Refuse, in one line naming it and what is allowed, an override Hydra would answer with a
    usage block, a traceback or misleading advice: a malformed one, a key no option has (with the
    closest names), a key the chosen option lacks, `+`/`~` on a key the schema has or lacks, and a
    group choice that is not a config's name."""
    parser = OverridesParser.create()
    parsed: list[Override] = []
    for line in lines:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as exc:  # Hydra's message shows only the bad part: name the whole override
            raise UserError(f"malformed override {line!r}: {' '.join(str(exc).split())}") from None
        if not override.key_or_group.strip("/."):
            raise UserError(f"malformed override {line!r}: expected key=value")
        parsed.append(override)
    groups = conf_groups()
    choices = default_choices()
    for override in parsed:
        if override.key_or_group in GROUPS and not override.is_sweep_override() and isinstance(override.value(), str):
            choices[override.key_or_group] = override.value()
    paths = keys.key_paths()
    for override in parsed:
        _check_override(override, groups, choices, paths)


def _check_override(override: Override, groups: dict[str, list[str]], choices: dict[str, str], paths: set[str]) -> None:
    key, line = override.key_or_group, override.input_line
    if key.startswith("hydra") or override.package is not None:
        if key.startswith("hydra/"):
            _check_group_choice(override, None)
        return
    if key in groups:
        _check_group_choice(override, groups[key])
        return
    dotted = key.replace("/", ".")
    if dotted.endswith(".name") and dotted[: -len(".name")] in GROUPS:
        group_name = dotted[: -len(".name")]
        raise ConfigError(
            f"invalid value {line}: the option of group {group_name} is chosen with {group_name}=NAME, "
            f"one of {', '.join(GROUPS[group_name])}"
        )
    if dotted not in paths:
        raise ConfigError(f"unknown key {line.lstrip('+~')}: {_unknown_key_hint(dotted, groups, choices, paths)}")
    owner = dotted.split(".")[0]
    if owner in GROUPS:
        found = next(k for k in keys.keys() if k.path == dotted)
        choice = choices.get(owner)
        if found.options and choice in GROUPS[owner] and choice not in found.options:
            keys_of = [k.path.split(".", 1)[1] for k in keys.group_keys(owner) if not k.options or choice in k.options]
            raise ConfigError(
                f"invalid key {dotted} with {owner}={choice}: it is a key of {owner}="
                f"{' and '.join(found.options)} only (the keys of {owner}={choice}: {', '.join(keys_of) or 'none'})"
            )
    if override.is_delete():
        raise ConfigError(f"cannot delete {dotted} with ~{dotted}: every key is required (set it with {dotted}=VALUE)")
    if override.is_add() or override.is_force_add():
        raise ConfigError(f"invalid override {line}: {dotted} is a key of vae-train already; drop the +")


def _unknown_key_hint(dotted: str, groups: dict[str, list[str]], choices: dict[str, str], paths: set[str]) -> str:
    """The closest keys of the option chosen (a key of a group's other options only where nothing of
    the chosen one reads like it, saying whose it is), and the keys of the chosen option."""
    section = dotted.rsplit(".", 1)[0] if "." in dotted else None
    choice = choices.get(section) if section in GROUPS else None
    if choice in GROUPS.get(section or "", {}):
        # the leaf names, so that the group's own prefix makes no two keys alike
        leaf = dotted.split(".", 1)[1]
        group = {k.path.split(".", 1)[1]: k.options for k in keys.group_keys(section)}
        own = sorted(name for name, options in group.items() if not options or choice in options)
        found = closest(leaf, own)
        other = closest(leaf, sorted(set(group) - set(own)))
        if found:
            hint = f"did you mean {' or '.join(f'{section}.{name}' for name in found)}? "
        elif other:
            hint = (
                f"{section}.{other[0]} is a key of {section}={' and '.join(group[other[0]])} only, "
                f"not of {section}={choice}; "
            )
        else:
            hint = ""
        return f"{hint}vae-train has no key {dotted} (the keys of {section}={choice}: {', '.join(own) or 'none'})"
    hint = did_you_mean(dotted, sorted(paths | set(groups)))
    siblings = sorted(p.split(".", 1)[1] for p in paths if section and p.startswith(section + "."))
    known = f"the keys of {section}: {', '.join(siblings)}" if siblings else "vae-train --help lists every key"
    return f"{hint}vae-train has no key {dotted} ({known})"


def _check_group_choice(override: Override, options: list[str] | None) -> None:
    """A config group (objective=, data=, hydra/launcher=, ...) takes a config's name; Hydra answers
    anything else (data=0, ~data=1) with a ValueError and a traceback, an unknown name with its search path."""
    key = override.key_or_group
    value = override.value()
    if override.is_sweep_override():
        names = [str(v) for v in override.sweep_iterator()] if options is not None else []
    elif isinstance(value, str):
        names = [value]
    elif value is None and override.is_delete():
        return
    else:
        allowed = f"one of {', '.join(options)}" if options is not None else "the name of one of its configs"
        raise UserError(f"invalid value {override.input_line!r}: the config group {key} takes {allowed}")
    for name in names if options is not None else []:
        if name not in options:
            raise ConfigError(
                f"invalid value {key}={name}: {did_you_mean(name, options)}the config group {key} takes "
                f"one of {', '.join(options)}"
            )


# --- --help and README, from the schema ---------------------------------------------------------------


def key_lines(width: int = 33) -> list[str]:
    """`key=default   help` for every key, the options it applies to first where not all."""
    lines = []
    for k in keys.keys():
        applies = f"{', '.join(k.options)}: " if k.options else ""
        lines.append(f"{k.path}={shown_default(k.default)}".ljust(width - 1) + f" {applies}{k.help}")
    return lines


def group_lines(width: int = 18) -> list[str]:
    defaults = default_choices()
    lines = []
    for group_name, options in GROUPS.items():
        names = ", ".join(f"{o} (default)" if o == defaults.get(group_name) else o for o in options)
        lines.append(f"{group_name}".ljust(width) + names)
        for option, (_, what) in options.items():
            lines.append(" " * (width + 2) + f"{option}: {what}")
    return lines


def _help_block(lines: list[str]) -> str:
    """Lines for the help template, which indents the first by 2 itself; `$` escaped for string.Template,
    which Hydra fills its help template with."""
    return "\n".join("  " + line for line in lines)[2:].replace("$", "$$")


HELP_PARTS = {
    "keys": lambda: _help_block(key_lines()),
    "groups": lambda: _help_block(group_lines()),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme_table() -> str:
    """The docs' key table (docs/configuration.md), made from the schema (`make keys-table` writes it; a test compares)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = default_choices()
    for group_name, options in GROUPS.items():
        what = "; ".join(f"`{o}`: {_cell(w)}" for o, (_, w) in options.items())
        rows.append(f"| `{group_name}` | `{defaults.get(group_name, '')}` | config group: {what} |")
    for k in keys.keys():
        applies = f"{', '.join(k.options)} only: " if k.options else ""
        rows.append(f"| `{k.path}` | `{shown_default(k.default)}` | {applies}{_cell(k.help)} |")
    return "\n".join(rows) + "\n"
