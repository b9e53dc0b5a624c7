"""Keeping the notebooks honest: re-execute them in place, make a student edition without solutions, and prove
that every exercise's check rejects what it should.

Exercise solutions live in code cells tagged ``solution``. The student edition replaces each such cell with a
placeholder and clears every output, so the check cell that follows an exercise fails until it is solved. The
wrong answers a check was written against are kept outside the notebooks, where no student edition shows them
(the tests keep them: complete replacement sources of the solution cell); ``unfooled_checks`` runs each of them,
and the placeholder, before the check. ``grade``
runs a submitted notebook and reports each exercise passed (its check ran without error), failed, or not run.
``with_nbgrader_metadata`` labels each exercise's cells for nbgrader (a solution cell, an autograded check).
"""

import copy
import json
import math
import os
import re
import time
from pathlib import Path

SOLUTION_TAG = "solution"
PLACEHOLDER = "# Your solution here: the next cell checks it.\n"


def execute_in_place(path, timeout=900):
    """Run every cell of one notebook top to bottom and store the outputs in the file."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        coalesce_streams=True,  # one output per stream: a print's text and its newline can arrive apart
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    client.execute()
    nbformat.write(nb, path)


def unfooled_checks(path, wrong_answers, timeout=900):
    """Run a notebook top to bottom in a fresh kernel; before each solution cell, run in its place the placeholder
    and every wrong answer recorded for that exercise (wrong_answers: {"ex1": [complete sources of the solution
    cell], ...}, exercises numbered in notebook order), each followed by the exercise's check (the next code
    cell). Return what went
    wrong, one line each: a check that accepted one of them, a wrong answer that failed by itself (it must be
    valid code so that only the check can reject it), or a real solution that failed its check."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    problems = []

    def runs(source, index):
        try:
            client.execute_cell(nbformat.v4.new_code_cell(source), index)
        except CellExecutionError:
            return False
        return True

    checks = {exercise["solution"]: (f"ex{k}", nb.cells[exercise["check"]].source)
              for k, exercise in enumerate(exercises(nb.cells), 1)}
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if index in checks:
                name, check = checks[index]
                for label, wrong in trials(wrong_answers.get(name, [])):
                    if not runs(wrong, index):
                        problems.append(f"cell {index}: {label} raises by itself, before its check runs")
                    elif runs(check, index):
                        problems.append(f"cell {index}: the check accepts {label}: {wrong.strip()[:80]!r}")
            if not runs(cell.source, index):
                problems.append(f"cell {index} raises as the notebook stands (a check fails its own solution?)")
                break
    return problems


def trials(wrong):
    """What an exercise's check must reject: the placeholder, and each wrong answer recorded for it."""
    return [("the placeholder", PLACEHOLDER)] + [(f"wrong answer {k}", source) for k, source in enumerate(wrong, 1)]


def is_solution(cell):
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_edition(notebook):
    """Return a copy of a notebook (parsed JSON) with solutions replaced and all outputs cleared."""
    nb = copy.deepcopy(notebook)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if is_solution(cell):
            cell["source"] = PLACEHOLDER
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_student_editions(notebook_dir, out_dir):
    """Write the student edition of every notebook in notebook_dir into out_dir; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(notebook_dir).glob("*.ipynb")):
        target = out_dir / path.name
        target.write_text(json.dumps(student_edition(json.loads(path.read_text())), indent=1) + "\n")
        written.append(target)
    return written


# An exercise's title: a heading or a bold line that starts "Exercise N" ("### Exercise 2: ...", "**Exercise 2: x.**").
EXERCISE_TITLE = re.compile(r"^\s*(?:#+\s*|\*\*)(Exercise\s+\d+[^*\n]*)", re.MULTILINE)

# Tags with which nbclient skips a cell or accepts its error: grading drops them from the checks.
NBCLIENT_LENIENT_TAGS = ("skip-execution", "raises-exception")


def exercises(cells):
    """Every exercise of a notebook's cells (parsed JSON or nbformat), in order: a dict with its title, the index
    of its solution cell and of its check (the next code cell), and the points the check is worth (its metadata's
    nbgrader "points", else its "points", else 1)."""
    found, start = [], 0
    code = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code"]
    for position, index in enumerate(code):
        if not is_solution(cells[index]):
            continue
        if position + 1 == len(code):
            raise ValueError(f"cell {index} is tagged {SOLUTION_TAG!r} but no code cell (its check) follows it")
        check = code[position + 1]
        titles = [match for cell in cells[start:index] if cell["cell_type"] == "markdown"
                  for match in EXERCISE_TITLE.findall(_text(cell))]
        metadata = cells[check].get("metadata", {})
        points = metadata.get("nbgrader", {}).get("points", metadata.get("points", 1))
        if isinstance(points, bool) or not isinstance(points, (int, float)) or not points >= 0:
            raise ValueError(f"cell {check} (a check) is worth points={points!r}: give a number of at least 0")
        found.append({"exercise": titles[-1].strip().rstrip(".") if titles else f"exercise {len(found) + 1}",
                      "solution": index, "check": check, "points": points})
        start = check + 1
    return found


NBGRADER_SCHEMA_VERSION = 3


def nbgrader_metadata(cells):
    """The nbgrader cell metadata (schema 3) that each exercise's cells carry, as {cell index: metadata}: the
    solution cell is an nbgrader solution cell (`nbgrader generate_assignment` replaces a solution cell without
    `### BEGIN SOLUTION` delimiters by its whole code stub), the check an autograded, locked test cell worth the
    exercise's points. grade_ids follow the exercises' order: "ex1-solution", "ex1-check", ..."""
    labels = {}
    for number, exercise in enumerate(exercises(cells), 1):
        labels[exercise["solution"]] = {"grade": False, "grade_id": f"ex{number}-solution", "locked": False,
                                        "schema_version": NBGRADER_SCHEMA_VERSION, "solution": True}
        labels[exercise["check"]] = {"grade": True, "grade_id": f"ex{number}-check", "locked": True,
                                     "points": exercise["points"], "schema_version": NBGRADER_SCHEMA_VERSION,
                                     "solution": False}
    return labels


def with_nbgrader_metadata(notebook):
    """Return a copy of a notebook (parsed JSON) whose exercise cells carry exactly `nbgrader_metadata` and whose
    other cells carry no nbgrader metadata; nothing else changes (sources, outputs, other metadata). Idempotent:
    a check keeps the points it has (nbgrader's, else its "points", else 1)."""
    nb = copy.deepcopy(notebook)
    labels = nbgrader_metadata(nb["cells"])
    for index, cell in enumerate(nb["cells"]):
        metadata = cell.setdefault("metadata", {})
        if index in labels:
            metadata["nbgrader"] = labels[index]
        else:
            metadata.pop("nbgrader", None)
    return nb


def write_nbgrader_metadata(path):
    """Give one notebook file `with_nbgrader_metadata` in place; return True if the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    labelled = json.dumps(with_nbgrader_metadata(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
    if labelled == text:
        return False
    path.write_text(labelled, encoding="utf-8")
    return True


def gradable(paths):
    """The notebooks that PATH arguments name (a directory: every *.ipynb in it, sorted), each checked to be a
    notebook with at least one exercise, before anything runs. Raises FileNotFoundError or ValueError, with the
    path, what was wrong and what to do."""
    notebooks = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.ipynb"))
            if not found:
                raise FileNotFoundError(f"PATH {path}: a directory with no *.ipynb in it; name notebooks or a "
                                        "directory of them (`make student` writes student/)")
            notebooks += found
        elif not path.exists():
            raise FileNotFoundError(f"PATH {path}: no such file or directory; name notebooks (.ipynb) or directories "
                                    "of them (`make student` writes student/)")
        else:
            notebooks.append(path)
    for path in notebooks:
        try:
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"] if path.suffix == ".ipynb" else None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            cells = None
        if not isinstance(cells, list):
            raise ValueError(f"PATH {path}: not a Jupyter notebook (a .ipynb file of JSON with cells); name the "
                             "notebook files to grade")
        try:
            found = exercises(cells)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"PATH {path}: its exercises cannot be read ({error}); grade a notebook of "
                             "notebooks/ or its student edition") from None
        if not found:
            raise ValueError(f"PATH {path}: no cell is tagged {SOLUTION_TAG!r}, so there is no exercise to grade "
                             "(were its cell tags lost?); grade a notebook of notebooks/ or its student edition")
    return notebooks


def grade(path, timeout=900):
    """Run a notebook cell by cell in a fresh kernel, within `timeout` seconds in all, going on after a cell that
    raises, and return one row (dict) per exercise: notebook, exercise, earned, possible, result ("passed" when its
    check ran without error, "failed", or "not run" when the notebook stopped before its check: the timeout, or the
    kernel died) and message (the check's error, or why it did not run; one line). The file is not changed."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    found = exercises(nb.cells)
    for exercise in found:  # a check runs, and its error counts, whatever tags a submission gave it
        metadata = nb.cells[exercise["check"]].metadata
        metadata["tags"] = [tag for tag in metadata.get("tags", []) if tag not in NBCLIENT_LENIENT_TAGS]
    os.environ.setdefault("PYTHONHASHSEED", "0")
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(path.parent.resolve())}},
                            timeout_func=lambda cell: max(1, math.ceil(deadline - time.monotonic())))
    done, errors, stopped = set(), {}, "not reached"
    with client.setup_kernel():
        deadline = time.monotonic() + timeout  # from the moment the kernel is ready: its start has its own limit
        for index, cell in enumerate(nb.cells[:found[-1]["check"] + 1]):  # nothing after the last check counts
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as error:
                errors[index] = _one_line(f"{error.ename}: {error.evalue}")
            except CellTimeoutError:
                stopped = f"the notebook ran past its {timeout:g} s timeout (cell {index}) before this check"
                break
            except DeadKernelError:
                stopped = f"the kernel died (in cell {index}: out of memory, or the code exited) before this check"
                break
            done.add(index)
    rows = []
    for exercise in found:
        check, points = exercise["check"], exercise["points"]
        result = "passed" if check in done and check not in errors else "failed" if check in done else "not run"
        rows.append({"notebook": str(path), "exercise": exercise["exercise"],
                     "earned": points if result == "passed" else 0, "possible": points, "result": result,
                     "message": errors.get(check, "") if result != "not run" else stopped})
    return rows


def grade_totals(rows):
    """Points earned and possible, and how many exercises passed, failed and were not run."""
    totals = {"earned": sum(row["earned"] for row in rows), "possible": sum(row["possible"] for row in rows),
              "exercises": len(rows)}
    totals.update({result.replace(" ", "_"): sum(row["result"] == result for row in rows)
                   for result in ("passed", "failed", "not run")})
    return totals


def write_json(path, data):
    """Write data as JSON to path completely or not at all (a temporary file beside it, then a rename)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def _text(cell):
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _one_line(message, limit=100):
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."
