"""The package's layers, read from its imports (every `import` and `from ... import` in minimind/**/*.py, lazy
ones inside functions included): a module imports only its own layer or the ones below it, and no two
top-level parts of the package import each other."""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minimind"

# Bottom to top; a part may import parts of its own tier or lower ones. "__init__" is `minimind` itself.
TIERS = [
    {"errors", "outputs", "device", "records", "help_format", "sources"},  # plain helpers; where records come from
    {"hub", "card", "push"},  # hub ids -> local snapshots, model cards, uploads (huggingface_hub only)
    {"model", "lora", "demo_data", "examples"},  # the plain model (HF remote code), LoRA layers and adapters, demo and example files
    {"tokenizer"},
    {"data", "kernels", "modeldir"},  # datasets; fast kernels beside the model; model directories
    {"train", "infer", "info"},
    {"serve", "eval", "convert"},
    {"demo", "cli", "completion", "config_file", "__main__", "__init__"},  # config_file: --config for every verb
]
TIER = {part: level for level, parts in enumerate(TIERS) for part in parts}
# What the issue names outright: the model layer imports none of these.
NOT_FROM_MODEL = {"tokenizer", "data", "train", "infer", "serve", "convert", "eval"}


def part_of(module: str) -> str:
    """minimind.infer.engine -> "infer"; minimind -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@functools.cache
def imports() -> dict[str, set[tuple[str, str]]]:
    """{part: {(imported part, "file:line"), ...}} over every import of another part of the package."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).with_suffix("").parts
        package = rel[:-1]  # what a relative import starts from, for a module and a package's __init__ alike
        here = part_of(".".join(rel if rel[-1] != "__init__" else rel[:-1]))
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                # `from minimind import model` imports the part `model`; `from minimind import __version__` not
                names = [module] + [f"{module}.{a.name}" for a in node.names if is_module(f"{module}.{a.name}")]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "minimind" and (name != "minimind" or len(names) == 1):
                    target = part_of(name)
                    if target != here:
                        edges[here].add((target, f"{file.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return edges


def test_every_part_of_the_package_has_a_tier():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert parts - set(TIER) == set(), "add the new part to TIERS"


def test_the_model_imports_nothing_above_it():
    found = sorted((target, where) for target, where in imports()["model"] if target in NOT_FROM_MODEL)
    assert found == []
    # Saved model directories ship minimind/model/*.py as remote code: nothing of this package outside it.
    assert sorted(imports()["model"]) == []


def test_imports_go_down_the_tiers():
    upward = sorted(f"{where}: {part} imports {target}" for part, targets in imports().items()
                    for target, where in targets if TIER[target] > TIER[part])
    assert upward == []


def test_no_two_parts_import_each_other():
    graph = {part: {target for target, _ in targets} for part, targets in imports().items()}
    cycles = []

    def visit(part: str, path: list[str]) -> None:
        for target in graph.get(part, ()):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(part)

    done: set[str] = set()
    for part in sorted(graph):
        if part not in done:
            visit(part, [part])
    assert cycles == []


def test_the_reader_finds_imports_the_package_is_known_to_have():
    """The test reads real edges (so the empty lists above mean something)."""
    edges = {part: {target for target, _ in targets} for part, targets in imports().items()}
    assert {"model", "kernels"} <= edges["infer"]
    assert "model" in edges["kernels"] and "lora" in edges["modeldir"] and "tokenizer" in edges["data"]
    assert "cli" in edges["__main__"]
