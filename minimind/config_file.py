"""`--config FILE` on every verb (README, "Config files and recipes"): a YAML, TOML or JSON object whose keys are
the verb's option names with underscores (`max_seq_len: 512`, `skip_bad_lines: true`) sets those options; flags on
the command line override it. A run's `train_config.json` is itself such a file: its "extra" object (the stage's
own options), "trackers" list and the fields a run records but no flag sets are read back, so

    minimind pretrain --config runs/pt/train_config.json --out runs/pt-again

replays the run. It works on the parser, not per verb: the file's values become the parser's defaults, then the
command line is parsed as usual.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from minimind.errors import UserError

# Keys a run's train_config.json records that are not options: the verb, the command line, where hub ids
# resolved from. Read back, they are ignored.
RECORDED = ("stage", "command", "hub_sources")


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--config` FILE or None, the other arguments); `--config=FILE` works too."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return None, argv
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config="):
            rest.append(arg)
    return known.config, rest


def load_config(path: str | Path) -> dict[str, Any]:
    """The object a .yaml/.yml, .toml or .json file holds (by suffix; any other suffix is tried as YAML, which
    also reads JSON). One-line error naming the file if it is missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError: one line
        raise UserError(f"{path}: not a valid config file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object of option names and values, got {type(data).__name__}")
    return data


def _flag_values(data: dict[str, Any]) -> dict[str, Any]:
    """A config object's keys as option names: dashes read as underscores, a train_config.json's "extra" and
    "trackers" spread into the options they came from."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key == "extra" and isinstance(value, dict):
            for inner, inner_value in value.items():
                values.setdefault(inner, inner_value)
        elif key == "trackers" and isinstance(value, list):
            values.update({str(tracker): True for tracker in value})
        else:
            values[key] = value
    # Stage options a run records in their parsed form, read back as the flag that gives them.
    if isinstance(values.get("overrides"), dict):
        values["set"] = [f"{k}={json.dumps(v)}" for k, v in values.pop("overrides").items()]
    if "targets" in values and "target_modules" not in values:
        targets = values.pop("targets")
        values["target_modules"] = targets
    return values


def apply_config(parser: argparse.ArgumentParser, path: str | Path, verb: str) -> None:
    """Make the options `path` sets the defaults of `parser` (and no longer required); an unknown key is a
    one-line error naming the file and the key."""
    values = _flag_values(load_config(path))
    actions = {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help", "config")}
    defaults = {}
    for key, value in values.items():
        if key in RECORDED:
            if key == "stage" and value != verb:
                raise UserError(f"{path}: stage is {value!r}, a config for `minimind {value}`, not `minimind {verb}`")
            continue
        if key in actions:
            action = actions[key]
            action.required = False
            if isinstance(action, argparse._StoreTrueAction) and not isinstance(value, bool):
                raise UserError(f"{path}: {key} is an on/off option; expected true or false, got {value!r}")
            if isinstance(value, list) and type(action) is argparse._StoreAction and action.nargs is None:
                # a comma-separated option (--tracker-tags, distill's --tags) that a run records as a list
                value = ",".join(str(v) for v in value)
            defaults[key] = value
        elif key in parser._defaults:  # set by the verb itself (e.g. the warmup cap a stage derives)
            continue
        elif not _recorded_default(verb, key, value):
            raise UserError(f"{path}: unknown key {key!r}; expected option names of `minimind {verb}` with "
                            "underscores (see --help)")
    parser.set_defaults(**defaults)


def _recorded_default(verb: str, key: str, value: Any) -> bool:
    """Whether `key` is a training setting a run records with no flag to change it, holding its default (as in
    a train_config.json read back): such a key is accepted and has nothing to set."""
    from minimind.train.args import TrainConfig

    field = TrainConfig.__dataclass_fields__.get(key)
    if field is None:
        return False
    default = field.default
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    return value == default
