"""`python -m minilora grade`: each exercise passed, failed or not run, and never passed unless its check ran.

Most cases use a synthetic notebook of a few cells (a kernel starts in about two seconds); one real notebook, the
cheapest (00, about ten seconds), is graded as committed (every exercise passes) and as its student edition (none
does).
"""

import json
from pathlib import Path

import nbformat
import pytest

from minilora import workbook
from minilora.__main__ import main

REPO = Path(__file__).resolve().parent.parent
CHEAPEST = REPO / "notebooks" / "00_lora_from_scratch.ipynb"


def exercise_notebook(path, middle="1 / 0"):
    """Three exercises: the first solved, then `middle` (a cell that is no exercise's), the second solved and
    worth 2 points (nbgrader metadata), the third left as the student edition's placeholder."""
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

    def solution(source):
        return code(source, metadata={"tags": [workbook.SOLUTION_TAG]})

    cells = [md("## Exercises\n\n**Exercise 1: double it.** Set `answer_1` to twice 3."),
             solution("answer_1 = 2 * 3"), code("assert answer_1 == 6, f'answer_1 = {answer_1}, not 6'"),
             code(middle),
             md("### Exercise 2: square it\n\nSet `answer_2`."), solution("answer_2 = 3 ** 2"),
             code("assert answer_2 == 9", metadata={"nbgrader": {"points": 2}}),
             md("Set `answer_3` to 4."), solution(workbook.PLACEHOLDER),
             # tags that would make nbclient skip the check or accept its error: a submission cannot pass this way
             code("assert answer_3 == 4", metadata={"tags": ["skip-execution", "raises-exception"]})]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def results(rows):
    return [(row["exercise"], row["result"], row["earned"], row["possible"]) for row in rows]


def test_a_crash_outside_an_exercise_leaves_the_later_exercises_graded(tmp_path):
    rows = workbook.grade(exercise_notebook(tmp_path / "lab.ipynb"), timeout=120)
    assert results(rows) == [("Exercise 1: double it", "passed", 1, 1), ("Exercise 2: square it", "passed", 2, 2),
                             ("exercise 3", "failed", 0, 1)]
    assert rows[2]["message"] == "NameError: name 'answer_3' is not defined"
    assert {row["notebook"] for row in rows} == {str(tmp_path / "lab.ipynb")}


@pytest.mark.parametrize("middle, why", [("import time\ntime.sleep(60)", "timeout"),
                                         ("import os\nos._exit(1)", "kernel died")])
def test_exercises_after_a_timeout_or_a_dead_kernel_are_not_run(tmp_path, middle, why):
    rows = workbook.grade(exercise_notebook(tmp_path / "lab.ipynb", middle), timeout=8)
    assert [row["result"] for row in rows] == ["passed", "not run", "not run"]
    assert [row["earned"] for row in rows] == [1, 0, 0]
    assert why in rows[1]["message"]


def test_the_command_prints_a_row_per_exercise_writes_json_and_exits_1_unless_all_passed(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["grade", str(exercise_notebook(tmp_path / "lab.ipynb")), "--json", str(report)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["notebook", "exercise", "points", "result", "message"]
    assert "Exercise 2: square it" in printed[2] and " 2/2 " in printed[2] and "passed" in printed[2]
    assert "failed" in printed[3] and printed[3].endswith("NameError: name 'answer_3' is not defined")
    assert printed[4] == "total: 3/4 points; 2 of 3 exercises passed, 1 failed, 0 not run"
    data = json.loads(report.read_text())
    assert set(data) == {"exercises", "totals", "timeout_s"}
    assert data["exercises"][1] == {"notebook": str(tmp_path / "lab.ipynb"), "exercise": "Exercise 2: square it",
                                    "earned": 2, "possible": 2, "result": "passed", "message": ""}
    assert data["totals"] == {"earned": 3, "possible": 4, "exercises": 3, "passed": 2, "failed": 1, "not_run": 0}
    assert not list(tmp_path.glob(".*.partial")), "the JSON is written whole: no temporary file is left"


def test_bad_paths_and_settings_end_in_one_line_before_anything_runs(tmp_path, capsys):
    lab = exercise_notebook(tmp_path / "lab.ipynb")
    (tmp_path / "notes.txt").write_text("not a notebook")
    (tmp_path / "broken.ipynb").write_text("{")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), tmp_path / "plain.ipynb")
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "missing.ipynb")], "PATH"), ([str(tmp_path / "notes.txt")], "not a Jupyter notebook"),
             ([str(tmp_path / "broken.ipynb")], "not a Jupyter notebook"),
             ([str(tmp_path / "plain.ipynb")], "no cell is tagged 'solution'"),
             ([str(tmp_path / "empty")], "no *.ipynb"),
             ([str(lab), "--timeout", "0"], "--timeout 0"),
             ([str(lab), "--json", str(tmp_path / "no" / "report.json")], "--json")]
    for argv, expected in cases:
        # a valid notebook first: nothing is executed when a later path is bad (its rows would be printed)
        argv = argv if argv[0] == str(lab) else [str(lab), *argv]
        assert main(["grade", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "", argv
        assert captured.err.startswith("python -m minilora grade: error: ") and expected in captured.err, argv
        assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_exercise_titles_and_points_from_the_cells():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    solution = code("a = 1", metadata={"tags": [workbook.SOLUTION_TAG]})
    cells = [md("Exercise 1 is predict, then run.\n\n**Exercise 1: one ranking per layer.** Replace ..."), solution,
             code("assert a", metadata={"points": 3}), md("No title here."), solution, code("assert a")]
    assert [(e["exercise"], e["points"], e["solution"], e["check"]) for e in workbook.exercises(cells)] == [
        ("Exercise 1: one ranking per layer", 3, 1, 2), ("exercise 2", 1, 4, 5)]


def test_a_real_notebook_passes_as_committed_and_fails_as_its_student_edition(tmp_path):
    original = workbook.grade(CHEAPEST)
    assert original and all(row["result"] == "passed" for row in original), original
    (student,) = [path for path in workbook.write_student_editions(CHEAPEST.parent, tmp_path)
                  if path.name == CHEAPEST.name]
    rows = workbook.grade(student)
    assert [row["exercise"] for row in rows] == [row["exercise"] for row in original]
    assert all(row["result"] == "failed" and row["earned"] == 0 for row in rows), rows
