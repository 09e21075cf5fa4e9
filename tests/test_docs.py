"""The documentation is code too: every public function's example runs, the docs' snippets run, and the
flag list in docs/command-line.md is the train command's ``--help``."""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import jax
import pytest

import jaxmnist

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def standard_promotion():
    """Doctests show the library as users call it, with JAX's default dtype promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.parametrize("name", jaxmnist.__all__)
def test_every_public_name_documents_itself_with_an_example_that_runs(name: str):
    value = getattr(jaxmnist, name)
    docstring = inspect.getdoc(value) or ""
    assert ">>>" in docstring, f"jaxmnist.{name} has no runnable example"
    if inspect.isfunction(value) or hasattr(value, "__wrapped__"):
        assert "Args:" in docstring and ("Returns:" in docstring or "Yields:" in docstring), name
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(value, name, globs={**vars(inspect.getmodule(value) or jaxmnist)}):
        runner.run(test)
    assert runner.failures == 0, f"jaxmnist.{name}: {runner.failures} failing example(s)"


def test_the_flag_list_in_the_docs_is_the_help_text(capsys, monkeypatch):
    from jaxmnist.commands.train import build_parser

    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to $COLUMNS; scripts/update_docs.py writes 100
    build_parser().print_help()
    help_text = capsys.readouterr().out
    documented = (ROOT / "docs" / "command-line.md").read_text()
    block = re.search(r"<!-- train --help -->\n```text\n(.*?)```", documented, flags=re.DOTALL)
    assert block, "docs/command-line.md lost its --help block"
    assert block.group(1) == help_text, "docs/command-line.md is out of date: paste `python -m jaxmnist.train --help`"


def test_the_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_bytes()) <= 8 * 1024
    for link in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(path.name, marks=[pytest.mark.slow] if path.name in ("research.md", "your-model.md") else [])
        for path in sorted((ROOT / "docs").glob("*.md"))
    ],
)
def test_docs_python_snippets_run(page: str, tmp_path, monkeypatch):
    """Each ```python block of a docs page runs as written (```py marks an excerpt that does not run alone)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, page, "exec"), {})
