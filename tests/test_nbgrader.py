"""The notebooks work in an nbgrader course as they are: every exercise carries the nbgrader metadata that
`python -m minilora label` writes, and one notebook makes the round trip an instructor makes (generate_assignment,
then autograde of a solved and of an unsolved submission) with full marks and zero."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minilora import workbook

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
ROUND_TRIP = REPO / "notebooks" / "00_lora_from_scratch.ipynb"  # about 10 s to run
BIN = Path(sys.executable).parent  # nbgrader is a dev dependency: installed beside this Python


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_exercise_carries_the_nbgrader_metadata(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert workbook.with_nbgrader_metadata(notebook) == notebook, (
        f"{path.name}: an exercise's nbgrader metadata is missing or differs (or a cell that is no exercise has "
        "some): run `python -m minilora label` and commit the notebook")
    labelled = [cell["metadata"]["nbgrader"] for cell in notebook["cells"] if "nbgrader" in cell["metadata"]]
    assert len(labelled) == 2 * len(workbook.exercises(notebook["cells"])) > 0


def cell(source, **metadata):
    return {"cell_type": "code", "execution_count": None, "id": "0", "metadata": metadata, "outputs": [],
            "source": source}


def test_with_nbgrader_metadata_labels_exercises_keeps_points_and_drops_stale_labels():
    stale = {"grade": True, "grade_id": "old", "locked": True, "points": 1, "schema_version": 3, "solution": False}
    notebook = {"cells": [
        {"cell_type": "markdown", "id": "1", "metadata": {}, "source": "**Exercise 1: a.**"},
        cell("x = 1", tags=["solution"]),
        cell("assert x == 1", nbgrader={"points": 3}),
        cell("print(x)", nbgrader=stale),
        cell("y = 2", tags=["solution"]),
        cell("assert y == 2", lines_to_next_cell=1),
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    labelled = workbook.with_nbgrader_metadata(notebook)
    assert workbook.with_nbgrader_metadata(labelled) == labelled  # idempotent
    assert notebook["cells"][3]["metadata"]["nbgrader"] == stale  # the input is not changed
    meta = [c["metadata"] for c in labelled["cells"]]
    assert meta[1] == {"tags": ["solution"], "nbgrader": {
        "grade": False, "grade_id": "ex1-solution", "locked": False, "schema_version": 3, "solution": True}}
    assert meta[2]["nbgrader"] == {"grade": True, "grade_id": "ex1-check", "locked": True, "points": 3,
                                   "schema_version": 3, "solution": False}
    assert meta[3] == {}
    assert meta[5] == {"lines_to_next_cell": 1, "nbgrader": {
        "grade": True, "grade_id": "ex2-check", "locked": True, "points": 1, "schema_version": 3, "solution": False}}
    assert [c["source"] for c in labelled["cells"]] == [c["source"] for c in notebook["cells"]]


def nbgrader(course, *args):
    """Run one nbgrader command in the course directory; fail the test, with nbgrader's log, if it fails."""
    command = [str(BIN / "nbgrader"), *args]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs `alembic` by name
    done = subprocess.run(command, cwd=course, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_nbgrader_round_trip_full_marks_for_the_solution_and_zero_for_the_release(tmp_path, monkeypatch):
    assert (BIN / "nbgrader").exists(), (f"nbgrader is not installed in {BIN}: it is a dev dependency "
                                         "(pip install -e '.[dev]')")
    course, name = tmp_path / "course", ROUND_TRIP.stem
    (course / "source" / "ps1").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(course)!r}\nc.CourseDirectory.course_id = 'minilora'\n")
    (course / "source" / "ps1" / ROUND_TRIP.name).write_bytes(ROUND_TRIP.read_bytes())

    nbgrader(course, "generate_assignment", "ps1", "--force")
    release = json.loads((course / "release" / "ps1" / ROUND_TRIP.name).read_text(encoding="utf-8"))
    source = json.loads(ROUND_TRIP.read_text(encoding="utf-8"))
    found = workbook.exercises(source["cells"])
    for exercise in found:  # the whole solution cell becomes nbgrader's stub; the check is kept as it is
        assert "".join(release["cells"][exercise["solution"]]["source"]) == (
            "# YOUR CODE HERE\nraise NotImplementedError()")
        assert release["cells"][exercise["check"]]["source"] == source["cells"][exercise["check"]]["source"]

    for student, submission in (("solved", ROUND_TRIP), ("unsolved", course / "release" / "ps1" / ROUND_TRIP.name)):
        (course / "submitted" / student / "ps1").mkdir(parents=True)
        (course / "submitted" / student / "ps1" / ROUND_TRIP.name).write_bytes(submission.read_bytes())
    nbgrader(course, "autograde", "ps1", "--force", "--ExecutePreprocessor.timeout=600")

    from nbgrader.api import Gradebook  # a dev dependency: missing, the test fails (never skips)

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # Gradebook runs `alembic` too
    possible = sum(exercise["points"] for exercise in found)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for student, expected in (("solved", possible), ("unsolved", 0)):
            notebook = gradebook.find_submission_notebook(name, "ps1", student)
            assert (notebook.score, notebook.max_score) == (expected, possible), student
            scores = {grade.name: grade.score for grade in notebook.grades}
            assert scores == {f"ex{k}-check": expected and exercise["points"]
                              for k, exercise in enumerate(found, 1)}, student

    nbgrader(course, "export", "--to", str(tmp_path / "grades.csv"))
    rows = (tmp_path / "grades.csv").read_text().splitlines()
    assert rows[0].startswith("assignment,") and len(rows) == 3
