"""Keeping the notebooks honest: re-execute them in place, make a student edition without solutions, and prove
that every exercise's check rejects what it should.

Exercise solutions live in code cells tagged ``solution``. The student edition replaces each such cell with a
placeholder and clears every output, so the check cell that follows an exercise fails until it is solved. The
wrong answers a check was written against are kept in the solution cell's metadata (``wrong_answers``: complete
replacement sources); ``unfooled_checks`` runs each of them, and the placeholder, before the check.
"""

import copy
import json
import os
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


def unfooled_checks(path, timeout=900):
    """Run a notebook top to bottom in a fresh kernel; before each solution cell, run in its place the placeholder
    and every recorded wrong answer, each followed by the exercise's check (the next code cell). Return what went
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

    with client.setup_kernel():
        code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
        for position, index in enumerate(code):
            cell = nb.cells[index]
            if is_solution(cell):
                check = nb.cells[code[position + 1]].source
                for label, wrong in trials(cell):
                    if not runs(wrong, index):
                        problems.append(f"cell {index}: {label} raises by itself, before its check runs")
                    elif runs(check, index):
                        problems.append(f"cell {index}: the check accepts {label}: {wrong.strip()[:80]!r}")
            if not runs(cell.source, index):
                problems.append(f"cell {index} raises as the notebook stands (a check fails its own solution?)")
                break
    return problems


def trials(cell):
    """What the check after a solution cell must reject: the placeholder, and each recorded wrong answer."""
    wrong = cell.get("metadata", {}).get("wrong_answers", [])
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
