"""Every exercise's check rejects the untouched placeholder and each wrong answer it was written against (kept in
its solution cell's metadata), and accepts the solution: run in a fresh kernel, one notebook at a time.

The checks do not depend on the floating-point environment, so `make test`'s second pass leaves this file out.
"""

import json
from pathlib import Path

import pytest

from minilora import workbook

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
WITH_WRONG_ANSWERS = [path for path in NOTEBOOKS if path.name < "05"]  # 05-09: their course issue adds them


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_check_rejects_the_placeholder_and_the_recorded_wrong_answers(path):
    assert workbook.unfooled_checks(path) == []


@pytest.mark.parametrize("path", WITH_WRONG_ANSWERS, ids=lambda p: p.name)
def test_every_exercise_records_the_wrong_answers_its_check_was_written_against(path):
    cells = json.loads(path.read_text())["cells"]
    solutions = [cell for cell in cells if workbook.is_solution(cell)]
    assert solutions and all(cell["metadata"].get("wrong_answers") for cell in solutions)
