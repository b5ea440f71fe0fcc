"""recipes/: every reference-run recipe loads through the real parser of its verb (no training), every key is a
known option, and each is the one-line command the README lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from minimind.cli import VERBS, parse_verb_args

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def verb_of(recipe: Path) -> str:
    return recipe.stem.rsplit("-", 1)[1]


def test_every_reference_run_has_pretrain_and_sft_recipes():
    names = {recipe.stem for recipe in RECIPES}
    for model in ("minimind2-small", "minimind2", "minimind2-moe", "minimind3", "minimind3-moe"):
        assert {f"{model}-pretrain", f"{model}-sft"} <= names, model


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_parses_and_sets_exactly_its_keys(recipe):
    verb = verb_of(recipe)
    assert verb in VERBS
    parser, args = parse_verb_args(verb, ["--config", str(recipe)])  # an unknown key would raise here
    keys = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    dests = {action.dest for action in parser._actions}
    assert set(keys) <= dests
    for key, value in keys.items():
        assert getattr(args, key) == value, (recipe.name, key)
    assert args.dtype == "bf16" and args.warmup_steps == 0
    assert f"minimind {verb} --config recipes/{recipe.name}" in README
