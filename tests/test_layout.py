"""The shape of the package, read from its sources: no import cycles, the library never imports a command,
the pure core imports no I/O, and the train command's flags come from ``TrainConfig``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "jaxmnist"
PURE_MODULES = (
    "jaxmnist.model",
    "jaxmnist.losses",
    "jaxmnist.normalization",
    "jaxmnist.train.adapters",
    "jaxmnist.train.state",
    "jaxmnist.train.steps",
)
IO_MODULES = (
    "jaxmnist.data",
    "jaxmnist.idx",
    "jaxmnist.download",
    "jaxmnist.tfds_source",
    "jaxmnist.paths",
    "jaxmnist.checkpoint",
    "jaxmnist.plots",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every jaxmnist module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "jaxmnist"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    # An import of "jaxmnist.a.b" (module or name) depends on the longest module prefix that exists.
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
            target = next((prefix for prefix in prefixes if prefix in modules), None)
            if target and target != name and target != "jaxmnist":
                targets.add(target)
        edges[name] = targets
    return edges


def _is_command(name: str) -> bool:
    return name.startswith("jaxmnist.commands") or name.endswith(".__main__")


def test_no_import_cycles_among_the_package_modules(graph):
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in visiting:
            cycles.append([*visiting[visiting.index(node) :], node])
            return
        if node in done:
            return
        visiting.append(node)
        for target in sorted(graph[node]):
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_library_never_imports_a_command(graph):
    offenders = {name: sorted(filter(_is_command, targets)) for name, targets in graph.items() if not _is_command(name)}
    assert not {name: targets for name, targets in offenders.items() if targets}


def test_the_pure_core_imports_no_io_module(graph):
    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    for module in PURE_MODULES:
        assert not reachable(module) & set(IO_MODULES), module


def test_every_command_has_the_same_shape(graph):
    for command in ("train", "predict", "backprop"):
        assert graph[f"jaxmnist.{command}.__main__"] == {f"jaxmnist.commands.{command}"}


def test_train_flags_are_built_from_the_config_fields():
    from jaxmnist.commands.train import build_parser
    from jaxmnist.config import TrainConfig

    actions = {action.dest: action for action in build_parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert field.metadata["flag"] in action.option_strings
        assert action.default == field.default, field.name
        assert tuple(action.choices or ()) == field.metadata["choices"], field.name
