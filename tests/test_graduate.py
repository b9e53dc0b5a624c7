"""The drift check: the package's graduated modules must equal their notebooks' cells, and edits are caught."""

import json
import shutil

import pytest

from minilora import graduate


def test_repository_has_no_drift(repo):
    assert graduate.check(repo) == []


def test_every_notebook_graduates_a_module(repo):
    for notebook in sorted((repo / "notebooks").glob("*.ipynb")):
        assert list(graduate.graduated_cells(notebook)), f"{notebook.name} graduates no code"


@pytest.fixture
def copy_of_repo(repo, tmp_path):
    shutil.copytree(repo / "notebooks", tmp_path / "notebooks")
    shutil.copytree(repo / "minilora", tmp_path / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    assert graduate.check(tmp_path) == []
    return tmp_path


def first_graduated(root):
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        for module, _ in graduate.graduated_cells(notebook):
            return notebook, root / module
    raise AssertionError("no graduated cell in any notebook")


def test_edit_in_the_package_is_caught(copy_of_repo):
    _, module = first_graduated(copy_of_repo)
    module.write_text(module.read_text().replace("\n", "\n# a hand edit\n", 3))
    problems = graduate.check(copy_of_repo)
    assert len(problems) == 1 and module.name in problems[0]


def test_edit_in_the_notebook_is_caught_and_graduate_repairs_it(copy_of_repo):
    notebook, module = first_graduated(copy_of_repo)
    nb = json.loads(notebook.read_text())
    cell = next(c for c in nb["cells"] if graduate.cell_source(c).startswith(graduate.MARKER))
    cell["source"] = graduate.cell_source(cell) + "\nEDITED_IN_THE_NOTEBOOK = True\n"
    notebook.write_text(json.dumps(nb))
    assert any(module.name in problem for problem in graduate.check(copy_of_repo))
    assert graduate.write(copy_of_repo) == [module.relative_to(copy_of_repo).as_posix()]
    assert "EDITED_IN_THE_NOTEBOOK = True" in module.read_text()
    assert graduate.check(copy_of_repo) == []


def test_deleted_module_and_orphaned_module_are_caught(copy_of_repo):
    _, module = first_graduated(copy_of_repo)
    text = module.read_text()
    module.unlink()
    assert any("missing" in problem for problem in graduate.check(copy_of_repo))
    orphan = copy_of_repo / "minilora" / "orphan.py"
    orphan.write_text(text)
    module.write_text(text)
    assert any("orphan.py" in problem for problem in graduate.check(copy_of_repo))


def test_two_notebooks_cannot_own_one_module(tmp_path):
    (tmp_path / "notebooks").mkdir()
    cell = {"cell_type": "code", "source": "# graduate: minilora/x.py\nX = 1\n", "metadata": {}, "outputs": []}
    for name in ("a.ipynb", "b.ipynb"):
        (tmp_path / "notebooks" / name).write_text(json.dumps({"cells": [cell]}))
    with pytest.raises(ValueError, match="one notebook owns a module"):
        graduate.expected_modules(tmp_path)
