"""Every exercise's check rejects the untouched placeholder and each wrong answer it was written against, and
accepts the solution: run in a fresh kernel, one notebook at a time.

The wrong answers live here, in wrong_answers.json ({notebook: {"ex1": [complete sources of the solution cell]}},
exercises numbered in notebook order), not in the notebooks: a student edition or an nbgrader release would show
them, and a list of the wrong options gives a predict-then-run answer away. Add your students' wrong answers there.

The checks do not depend on the floating-point environment, so `make test`'s second pass leaves this file out.
"""

import json
from pathlib import Path

import pytest

from minilora import workbook

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted((HERE.parent / "notebooks").glob("*.ipynb"))
WRONG_ANSWERS = json.loads((HERE / "wrong_answers.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_check_rejects_the_placeholder_and_the_recorded_wrong_answers(path):
    assert workbook.unfooled_checks(path, WRONG_ANSWERS.get(path.name, {})) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_wrong_answers_recorded_here_and_none_in_the_notebook(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    exercises = [f"ex{k}" for k in range(1, len(workbook.exercises(cells)) + 1)]
    recorded = WRONG_ANSWERS.get(path.name, {})
    assert exercises and sorted(recorded) == sorted(exercises), "one entry per exercise, none for a missing one"
    assert all(recorded[name] for name in exercises), "each exercise needs at least one wrong answer"
    assert not any("wrong_answers" in cell["metadata"] for cell in cells), "a student edition would show them"


def test_every_notebook_has_its_wrong_answers():
    assert sorted(WRONG_ANSWERS) == [path.name for path in NOTEBOOKS]
